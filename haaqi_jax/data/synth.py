"""Synthesized multi-instrument music for the demo dataset (no downloads, deterministic).

A piece is a few bars in one of several styles: a chord progression in a random key and mode,
a melody that walks the scale and leans on chord tones, a bass line, an accompaniment pattern and
a drum pattern, each played by a randomly chosen timbre (additive, FM, Karplus-Strong plucks,
noise drums). Every part is panned (with a small inter-channel delay on some) and sent through
a noise-tail reverb; the stereo mix is then folded down to mono, which colours it the way real
stereo-to-mono downmixes do. Rendering is vectorised per note (no per-sample Python loops).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.ndimage
import scipy.signal

#: HAAQI's internal sample rate; the demo data is written at this rate.
SAMPLE_RATE = 24_000
#: RMS of a synthesized piece (-20 dBFS) before the dataset applies its own level.
PIECE_RMS = 0.1
#: Crest factor (peak / RMS) range the mastering limiter sets, dB.
CREST_DB = (9.0, 14.0)

_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
_MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
_DORIAN = np.array([0, 2, 3, 5, 7, 9, 10])
_PITCH_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


@dataclasses.dataclass(frozen=True)
class Style:
    """How a style picks tempo, harmony, rhythm and instruments."""

    name: str
    tempo_range: tuple[float, float]
    modes: tuple[str, ...]
    progressions: tuple[tuple[int, ...], ...]  # 0-based scale degrees, one chord per bar
    melody: tuple[str, ...]
    chords: tuple[str, ...]
    bass: tuple[str, ...]
    comping: tuple[str, ...]  # accompaniment patterns
    bass_pattern: str
    drums: str | None  # drum pattern name
    swing: bool = False
    sevenths: bool = False


STYLES: dict[str, Style] = {
    s.name: s for s in (
        Style("pop", (90, 128), ("major", "minor"),
              ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4)),
              ("epiano", "synth_lead", "flute"), ("pad", "epiano", "guitar"),
              ("synth_bass", "pluck_bass"), ("sustain", "strum"), "root_eighths", "pop"),
        Style("rock", (110, 150), ("major", "minor"),
              ((0, 6, 3, 0), (0, 3, 4, 3), (0, 5, 3, 4)),
              ("brass", "synth_lead", "guitar"), ("guitar", "organ"),
              ("pluck_bass", "synth_bass"), ("strum",), "root_eighths", "rock"),
        Style("jazz", (80, 140), ("major", "dorian"),
              ((1, 4, 0, 0), (0, 5, 1, 4), (1, 4, 0, 5)),
              ("brass", "epiano", "flute"), ("epiano", "organ"),
              ("pluck_bass",), ("comp",), "walking", "jazz", swing=True, sevenths=True),
        Style("classical", (60, 100), ("major", "minor"),
              ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 2)),
              ("flute", "strings", "bell"), ("strings", "harp"),
              ("strings",), ("arpeggio", "sustain"), "sustained", None),
        Style("folk", (80, 120), ("major", "minor"),
              ((0, 3, 0, 4), (0, 4, 5, 3), (5, 3, 0, 4)),
              ("flute", "guitar", "harp"), ("guitar", "harp"),
              ("pluck_bass",), ("arpeggio", "strum"), "root_fifth", "folk"),
        Style("electronic", (118, 135), ("minor",),
              ((0, 5, 2, 6), (0, 3, 5, 4), (0, 0, 5, 6)),
              ("synth_lead", "bell"), ("pad", "organ"),
              ("synth_bass",), ("arpeggio", "sustain"), "root_eighths", "four_on_floor"),
    )
}


def _midi_to_hz(midi):
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)


# ----------------------------------------------------------------------------------- timbres
# Each timbre renders one note: (freq Hz, n samples, sample rate, velocity 0..1, rng) -> (n,).

def _envelope(n: int, sr: int, attack: float, decay: float, sustain: float,
              release: float) -> np.ndarray:
    """ADSR over n samples; the release occupies the last `release` seconds."""
    t = np.arange(n) / sr
    dur = n / sr
    rel_start = max(dur - release, 1e-3)
    env = np.where(t < attack, t / max(attack, 1e-4),
                   sustain + (1.0 - sustain) * np.exp(-(t - attack) / max(decay, 1e-4)))
    fade = np.clip((dur - t) / max(dur - rel_start, 1e-4), 0.0, 1.0)
    return env * np.where(t < rel_start, 1.0, fade)


def _additive(freq, n, sr, amps, *, vibrato_hz=0.0, vibrato_depth=0.0, detune_cents=(0.0,),
              rng=None):
    """Sum of harmonics k*freq with amplitudes amps[k-1] (partials above Nyquist dropped)."""
    t = np.arange(n) / sr
    k = np.arange(1, len(amps) + 1)[:, None]
    amps = np.asarray(amps, dtype=np.float64)[:, None] * (k * freq < 0.45 * sr)
    phase0 = 0.0 if rng is None else rng.uniform(0, 2 * np.pi)
    vib = vibrato_depth * np.sin(2 * np.pi * vibrato_hz * t + phase0) if vibrato_hz else 0.0
    # Instantaneous phase of the fundamental (with vibrato), shared by all harmonics.
    base_phase = 2 * np.pi * np.cumsum(freq * (1.0 + vib) * np.ones(n)) / sr
    out = np.zeros(n)
    for cents in detune_cents:  # a few detuned voices, not per sample
        phase = base_phase * 2.0 ** (cents / 1200.0)
        out += (amps * np.sin(k * phase[None, :])).sum(0)
    return out / len(detune_cents)


def _fm(freq, n, sr, ratio, index, index_decay):
    """Two-operator FM with an exponentially decaying modulation index (brightness)."""
    t = np.arange(n) / sr
    idx = index * np.exp(-t / index_decay)
    return np.sin(2 * np.pi * freq * t + idx * np.sin(2 * np.pi * freq * ratio * t))


def _karplus_strong(freq, n, sr, velocity, t60, rng):
    """Plucked string: a noise burst through a comb loop with a 2-tap low-pass and an all-pass.

    The loop delay is L + 1/2 (low-pass) + d (all-pass, fractional tuning); the closed loop is a
    rational filter, so one scipy lfilter renders the note.
    """
    period = sr / freq
    delay_int = int(np.floor(period - 0.5))
    frac = period - 0.5 - delay_int
    if frac < 0.1:  # keep the all-pass delay in its well-behaved range
        delay_int -= 1
        frac += 1.0
    c = (1.0 - frac) / (1.0 + frac)
    g = 10.0 ** (-3.0 / (t60 * freq))  # loop gain for the requested decay
    burst = rng.uniform(-1, 1, delay_int + 1)
    # Softer plucks are darker: smooth the excitation.
    burst = scipy.signal.lfilter([1.0 - 0.7 * (1 - velocity)], [1, -0.7 * (1 - velocity)], burst)
    x = np.zeros(n)
    x[: min(n, burst.size)] = burst[:n]
    a = np.zeros(delay_int + 3)
    a[0], a[1] = 1.0, c
    a[delay_int:delay_int + 3] += -0.5 * g * np.array([c, 1.0 + c, 1.0])
    return scipy.signal.lfilter([1.0, c], a, x)


def _render_timbre(name: str, freq: float, n: int, sr: int, vel: float,
                   rng: np.random.Generator) -> np.ndarray:
    if name == "epiano":
        y = _fm(freq, n, sr, 1.0, 2.0 + 2.5 * vel, 0.3) + 0.2 * _fm(freq, n, sr, 14.0, 1.0, 0.02)
        return y * _envelope(n, sr, 0.002, 0.6, 0.25, 0.08)
    if name == "bell":
        return _fm(freq, n, sr, 3.5, 3.0 * vel + 1.0, 1.0) * _envelope(n, sr, 0.001, 1.0, 0.0, 0.1)
    if name == "brass":
        env = _envelope(n, sr, 0.04, 0.2, 0.7, 0.06)
        t = np.arange(n) / sr
        return np.sin(2 * np.pi * freq * t + (1.0 + 3.5 * vel) * env
                      * np.sin(2 * np.pi * freq * t)) * env
    if name == "organ":
        amps = np.array([1.0, 0.8, 0.0, 0.5, 0.0, 0.3, 0.0, 0.25]) * rng.uniform(0.5, 1.0, 8)
        return _additive(freq, n, sr, amps) * _envelope(n, sr, 0.01, 0.1, 0.9, 0.03)
    if name in ("strings", "pad"):
        amps = 1.0 / np.arange(1, 17) ** (1.2 if name == "strings" else 1.8)
        y = _additive(freq, n, sr, amps, vibrato_hz=5.0 if name == "strings" else 0.3,
                      vibrato_depth=0.004, detune_cents=(-7.0, 0.0, 6.0), rng=rng)
        return y * _envelope(n, sr, 0.12 if name == "strings" else 0.3, 0.3, 0.85, 0.2)
    if name == "flute":
        amps = np.array([1.0, 0.35, 0.12, 0.05])
        y = _additive(freq, n, sr, amps, vibrato_hz=5.5, vibrato_depth=0.003, rng=rng)
        breath = scipy.signal.lfilter(*scipy.signal.butter(2, [min(freq, 0.4 * sr),
                                                               min(4 * freq, 0.45 * sr)],
                                                           "bandpass", fs=sr),
                                      rng.standard_normal(n))
        return (y + 0.08 * breath) * _envelope(n, sr, 0.05, 0.2, 0.8, 0.05)
    if name == "synth_lead":
        y = _additive(freq, n, sr, 1.0 / np.arange(1, 25), detune_cents=(-5.0, 5.0), rng=rng)
        return y * _envelope(n, sr, 0.01, 0.15, 0.6, 0.04)
    if name == "synth_bass":
        k = np.arange(1, 13)
        y = _additive(freq, n, sr, (1.0 / k) * np.exp(-k / (2.0 + 4.0 * vel)))
        return y * _envelope(n, sr, 0.005, 0.25, 0.5, 0.03)
    if name in ("guitar", "harp", "pluck_bass"):
        t60 = {"guitar": 1.5, "harp": 2.5, "pluck_bass": 1.2}[name]
        y = _karplus_strong(freq, n, sr, vel, t60, rng)
        return y * _envelope(n, sr, 0.0, 10.0, 1.0, 0.03)
    raise ValueError(f"unknown timbre {name!r}")


# ------------------------------------------------------------------------------------ drums

def _drum_hit(kind: str, sr: int, vel: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "kick":
        n = int(0.35 * sr)
        t = np.arange(n) / sr
        f = 45.0 + 110.0 * np.exp(-t / 0.03)  # pitch drop
        return np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / 0.12) * vel
    if kind == "snare":
        n = int(0.25 * sr)
        t = np.arange(n) / sr
        band = [1500, min(9000, 0.45 * sr)]                  # below Nyquist at 16-18 kHz too
        noise = scipy.signal.sosfilt(scipy.signal.butter(2, band, "bandpass", fs=sr,
                                                         output="sos"), rng.standard_normal(n))
        tone = np.sin(2 * np.pi * 190.0 * t)
        return (0.9 * noise * np.exp(-t / 0.06) + 0.5 * tone * np.exp(-t / 0.04)) * vel
    if kind in ("hat", "ride"):
        n = int((0.08 if kind == "hat" else 0.6) * sr)
        t = np.arange(n) / sr
        noise = scipy.signal.sosfilt(scipy.signal.butter(4, 7000, "highpass", fs=sr, output="sos"),
                                     rng.standard_normal(n))
        return 0.5 * noise * np.exp(-t / (0.02 if kind == "hat" else 0.25)) * vel
    raise ValueError(f"unknown drum {kind!r}")


# 16 steps per bar; 1 = hit (velocity varies).
_DRUM_PATTERNS = {
    "pop": {"kick": "1000001010000000", "snare": "0000100000001000", "hat": "1010101010101010"},
    "rock": {"kick": "1000000110100000", "snare": "0000100000001000", "hat": "1010101010101010"},
    "jazz": {"kick": "1000000000000000", "snare": "0000000000001000", "ride": "1000101110001011"},
    "folk": {"kick": "1000000010000000", "snare": "0000100000001000", "hat": "0010001000100010"},
    "four_on_floor": {"kick": "1000100010001000", "snare": "0000100000001000",
                      "hat": "0010001000100010"},
}


# ------------------------------------------------------------------------------------- score

@dataclasses.dataclass(frozen=True)
class _Note:
    onset: float  # seconds
    duration: float  # seconds
    midi: float
    velocity: float


def _scale_midi(tonic: int, scale: np.ndarray, degree: np.ndarray | int) -> np.ndarray:
    degree = np.asarray(degree)
    return tonic + 12 * (degree // 7) + scale[degree % 7]


def _chord_degrees(root: int, sevenths: bool) -> np.ndarray:
    return root + np.array([0, 2, 4, 6] if sevenths else [0, 2, 4])


def _write_score(style: Style, rng: np.random.Generator, seconds: float):
    tempo = float(rng.uniform(*style.tempo_range))
    beat = 60.0 / tempo
    bar = 4 * beat
    n_bars = int(np.ceil(seconds / bar)) + 1
    tonic_pc = int(rng.integers(12))
    mode = str(rng.choice(style.modes))
    scale = {"major": _MAJOR, "minor": _MINOR, "dorian": _DORIAN}[mode]
    prog = style.progressions[int(rng.integers(len(style.progressions)))]
    roots = np.array([prog[b % len(prog)] for b in range(n_bars)])
    swing = (lambda x: x + (beat / 6.0) * ((np.round(x / (beat / 2)) % 2) == 1)) if style.swing \
        else (lambda x: x)

    def human(x):  # onset jitter, seconds
        return max(0.0, float(x + rng.normal(0.0, 0.008)))

    parts: dict[str, list[_Note]] = {"melody": [], "chords": [], "bass": []}
    # Melody: 2-bar phrases of quarter/eighth notes walking the scale, chord tones on beats.
    tonic_mel = 60 + tonic_pc + (12 if tonic_pc < 5 else 0)
    degree = int(rng.integers(0, 5))
    t = 0.0
    while t < n_bars * bar:
        bar_idx = int(t // bar)
        in_phrase = (t % (2 * bar)) / (2 * bar)
        dur = float(rng.choice([beat / 2, beat, beat, 1.5 * beat, 2 * beat] if in_phrase < 0.8
                               else [beat, 2 * beat]))
        if rng.random() < (0.1 if in_phrase < 0.8 else 0.4):
            t += dur
            continue
        on_beat = abs((t / beat) - round(t / beat)) < 1e-6
        step = int(rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]))
        degree = int(np.clip(degree + step, -2, 10))
        if on_beat:  # snap to the nearest chord tone
            tones = _chord_degrees(roots[min(bar_idx, n_bars - 1)], style.sevenths)
            tones = np.concatenate([tones - 7, tones, tones + 7])
            degree = int(tones[np.argmin(np.abs(tones - degree))])
        parts["melody"].append(_Note(human(swing(t)), dur * 0.95,
                                     float(_scale_midi(tonic_mel, scale, degree)),
                                     float(rng.uniform(0.55, 1.0))))
        t += dur
    # Accompaniment.
    pattern = str(rng.choice(style.comping))
    tonic_ch = 48 + tonic_pc + (12 if tonic_pc < 7 else 0)
    for b in range(n_bars):
        chord = _scale_midi(tonic_ch, scale, _chord_degrees(roots[b], style.sevenths))
        t0 = b * bar
        if pattern == "sustain":
            for m in chord:
                parts["chords"].append(_Note(human(t0), bar * 0.98, float(m),
                                             float(rng.uniform(0.5, 0.8))))
        elif pattern == "strum":
            for beat_i in (0, 1, 2, 3):
                if beat_i in (1, 3) and rng.random() < 0.3:
                    continue
                for j, m in enumerate(chord):  # down-strum: 12 ms between strings
                    parts["chords"].append(_Note(human(t0 + beat_i * beat) + 0.012 * j,
                                                 beat * 0.95, float(m),
                                                 float(rng.uniform(0.5, 0.9))))
        elif pattern == "comp":
            for pos in sorted(rng.choice([0.0, 1.5, 2.0, 2.5, 3.5], 2, replace=False)):
                for m in chord:
                    parts["chords"].append(_Note(human(swing(t0 + pos * beat)), beat * 0.6,
                                                 float(m), float(rng.uniform(0.5, 0.85))))
        elif pattern == "arpeggio":
            seq = np.concatenate([chord, chord[1:-1][::-1]])
            for i in range(8):
                parts["chords"].append(_Note(human(t0 + i * beat / 2), beat * 0.9,
                                             float(seq[i % seq.size]),
                                             float(rng.uniform(0.45, 0.8))))
        else:
            raise ValueError(f"unknown comping pattern {pattern!r}")
    # Bass.
    tonic_b = 36 + tonic_pc
    for b in range(n_bars):
        root = float(_scale_midi(tonic_b, scale, roots[b]))
        fifth = float(_scale_midi(tonic_b, scale, roots[b] + 4))
        t0 = b * bar
        if style.bass_pattern == "root_eighths":
            for i in range(8):
                parts["bass"].append(_Note(human(t0 + i * beat / 2), beat * 0.45,
                                           root + (12 if i == 7 and rng.random() < 0.3 else 0),
                                           float(0.9 if i % 2 == 0 else 0.65)))
        elif style.bass_pattern == "root_fifth":
            for i, m in enumerate((root, fifth, root, fifth)):
                parts["bass"].append(_Note(human(t0 + i * beat), beat * 0.9, m, 0.8))
        elif style.bass_pattern == "walking":
            nxt = float(_scale_midi(tonic_b, scale, roots[(b + 1) % n_bars]))
            walk = [root, float(_scale_midi(tonic_b, scale, roots[b] + 2)), fifth,
                    nxt + float(rng.choice([-1, 1]))]
            for i, m in enumerate(walk):
                parts["bass"].append(_Note(human(swing(t0 + i * beat)), beat * 0.9, m,
                                           float(rng.uniform(0.7, 0.95))))
        elif style.bass_pattern == "sustained":
            parts["bass"].append(_Note(human(t0), bar * 0.98, root, 0.7))
        else:
            raise ValueError(f"unknown bass pattern {style.bass_pattern!r}")
    info = {"style": style.name, "tempo_bpm": round(tempo, 2),
            "key": f"{_PITCH_NAMES[tonic_pc]} {mode}", "bars": n_bars}
    return parts, info, beat, n_bars, swing


# -------------------------------------------------------------------------------------- mix

def _reverb_ir(sr: int, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Exponentially decaying, darkening noise tail (a cheap room), shape (2, n)."""
    n = int(rt60 * sr)
    t = np.arange(n) / sr
    noise = rng.standard_normal((2, n)) * np.exp(-6.9 * t / rt60)
    sos = scipy.signal.butter(1, 5000, "lowpass", fs=sr, output="sos")
    ir = scipy.signal.sosfilt(sos, noise, axis=-1)
    return ir / np.sqrt(np.sum(ir ** 2, axis=-1, keepdims=True))


def peak_limit(x: np.ndarray, ceiling: float, sample_rate: int,
               window_s: float = 0.005) -> np.ndarray:
    """Zero-phase look-ahead limiter: |output| <= ceiling exactly, gain changes over window_s.

    The needed gain min(1, ceiling/|x|) is min-held over a centred window of W samples and then
    box-smoothed over W samples: every sample under the box around a peak holds that peak's
    gain or less, so the smoothed gain never lets a peak through. (N,) -> (N,).
    """
    w = max(1, int(window_s * sample_rate)) | 1  # odd, so both filters are centred
    need = np.minimum(1.0, ceiling / np.maximum(np.abs(x), 1e-12))
    held = scipy.ndimage.minimum_filter1d(need, 2 * w - 1, mode="nearest")
    gain = scipy.ndimage.uniform_filter1d(held, w, mode="nearest")
    return x * np.minimum(gain, need)


def synthesize_piece(rng: np.random.Generator, seconds: float, *,
                     sample_rate: int = SAMPLE_RATE,
                     style: str | None = None) -> tuple[np.ndarray, dict]:
    """Renders one multi-instrument piece folded down to mono.

    Args:
      rng: numpy Generator; the piece is a pure function of its state.
      seconds: length of the returned clip.
      sample_rate: Hz.
      style: one of STYLES, or None for a random one.

    Returns:
      (audio (N,) float32 with RMS PIECE_RMS, N = round(seconds * sample_rate);
       info dict: style, tempo_bpm, key, bars, instruments).
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if style is None:
        style = str(rng.choice(sorted(STYLES)))
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; choose from {sorted(STYLES)}")
    st = STYLES[style]
    sr = int(sample_rate)
    n_out = int(round(seconds * sr))
    parts, info, beat, n_bars, swing = _write_score(st, rng, seconds)
    instruments = {"melody": str(rng.choice(st.melody)), "chords": str(rng.choice(st.chords)),
                   "bass": str(rng.choice(st.bass))}
    gains_db = {"melody": 0.0, "chords": -6.0, "bass": -3.0, "drums": -4.0}
    n_buf = n_out + int(3.0 * sr)
    dry = np.zeros((2, n_buf))
    # Crescendo / diminuendo over the piece: +-6 dB, piecewise linear through 3 points.
    dyn_db = np.interp(np.arange(n_buf) / n_buf, [0.0, 0.5, 1.0], rng.uniform(-6, 6, 3))
    for part, notes in parts.items():
        timbre = instruments[part]
        pan = {"bass": 0.0}.get(part, float(rng.uniform(-0.7, 0.7)))
        haas = int(rng.uniform(0, 0.012) * sr) if rng.random() < 0.4 else 0
        gain = 10.0 ** ((gains_db[part] + rng.uniform(-3, 3)) / 20.0)
        track = np.zeros(n_buf)
        for note in notes:
            start = int(note.onset * sr)
            if start >= n_out:
                continue
            # Plucks and bells ring past their nominal duration.
            ring = 1.0 if timbre in ("guitar", "harp", "pluck_bass", "bell") else 0.0
            n = min(int((note.duration + ring * 0.6) * sr), n_buf - start)
            if n <= 16:
                continue
            y = _render_timbre(timbre, float(_midi_to_hz(note.midi)), n, sr, note.velocity, rng)
            track[start:start + n] += note.velocity * y / (np.sqrt(np.mean(y ** 2)) + 1e-9)
        track *= gain
        left, right = np.sqrt(0.5 * (1 - pan)), np.sqrt(0.5 * (1 + pan))
        dry[0] += left * track
        dry[1] += right * np.roll(track, haas)
    if st.drums is not None:
        pat = _DRUM_PATTERNS[st.drums]
        step = beat / 4
        for kind, hits in pat.items():
            steps = np.flatnonzero(np.array(list(hits)) == "1")
            hit_times = (np.arange(n_bars)[:, None] * 16 + steps[None, :]).ravel() * step
            pan = float(rng.uniform(-0.3, 0.3))
            track = np.zeros(n_buf)
            for ht in hit_times:
                start = int((swing(ht) + rng.normal(0, 0.004)) * sr)
                if not 0 <= start < n_out:
                    continue
                y = _drum_hit(kind, sr, float(rng.uniform(0.6, 1.0)), rng)[: n_buf - start]
                track[start:start + y.size] += y
            track *= 10.0 ** ((gains_db["drums"] + rng.uniform(-3, 3)) / 20.0)
            dry[0] += np.sqrt(0.5 * (1 - pan)) * track
            dry[1] += np.sqrt(0.5 * (1 + pan)) * track
        instruments["drums"] = st.drums
    dry *= 10.0 ** (dyn_db / 20.0)
    rt60 = float(rng.uniform(0.3, 1.6))
    wet_gain = float(rng.uniform(0.05, 0.3))
    ir = _reverb_ir(sr, rt60, rng)
    wet = scipy.signal.fftconvolve(dry, ir, axes=-1)[:, :n_buf]
    stereo = dry + wet_gain * wet
    mono = 0.5 * (stereo[0] + stereo[1])[:n_out]
    fade = min(int(0.01 * sr), n_out // 2)
    mono[:fade] *= np.linspace(0.0, 1.0, fade)
    mono[n_out - fade:] *= np.linspace(1.0, 0.0, fade)
    # Mastering: limit the crest factor to 9-14 dB, as released music is.
    crest_db = float(rng.uniform(*CREST_DB))
    for _ in range(3):  # limiting lowers the RMS; a few rounds settle the crest factor
        rms = np.sqrt(np.mean(mono ** 2)) + 1e-12
        mono = peak_limit(mono, rms * 10.0 ** (crest_db / 20.0), sr)
    mono *= PIECE_RMS / (np.sqrt(np.mean(mono ** 2)) + 1e-12)
    info.update(crest_db=round(crest_db, 2), instruments=instruments, rt60_s=round(rt60, 3), reverb_gain=round(wet_gain, 3))
    return mono.astype(np.float32), info
