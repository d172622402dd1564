"""Damage that a decoder papers over: files that decode "fine" although their data is corrupt.

libjpeg treats corrupt entropy-coded data (overwritten or missing bytes in the middle of a JPEG) as a
*warning*: it fills the damaged blocks with grey or garbage and carries on. Pillow silences those
warnings, and nothing reads the bytes after the end-of-image marker, so a JPEG with corrupted middle
bytes or with trailing garbage decodes as if it were fine. :func:`jpeg_damage` finds both:

- the marker structure is walked in Python (segments by their lengths, entropy-coded data up to the
  next marker) to find the end-of-image marker and what follows it;
- the file is decoded once more by OpenCV's libjpeg-turbo at 1/8 scale in grey (the entropy decoding,
  where corruption shows, is done in full; the cheap inverse DCT at 1/64 of the pixels), and the
  warnings libjpeg prints on the C ``stderr`` are captured. That is the only place libjpeg reports
  them through either binding, so file descriptor 2 is pointed at a temporary file for the call,
  under a lock (one capture at a time), and whatever else was written meanwhile is passed on to the
  real stderr.

PNG chunks carry a CRC, which Pillow does not check for the image data: :func:`png_damage` checks
every chunk's CRC and what follows the end chunk. :func:`file_damage` dispatches on the format, and
:func:`nonfinite_damage` finds NaN or infinite pixels in float images.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import zlib

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "CHECKED_FORMATS", "file_damage", "jpeg_damage", "jpeg_end", "libjpeg_warnings",
    "nonfinite_damage", "png_damage", "trailing_data_damage",
]  # fmt: skip

logger = logging.getLogger(__name__)

# After an SOS header: the entropy-coded data runs to the first marker, i.e. 0xFF (possibly several,
# as fill bytes) followed by a byte other than 0x00 (a stuffed 0xFF data byte) or RST0-RST7.
_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xff\xd0-\xd7]")

# libjpeg warnings that mean the pixels are wrong (jerror.h: JWRN_EXTRANEOUS_DATA, JWRN_HIT_MARKER,
# JWRN_HUFF_BAD_CODE, JWRN_MUST_RESYNC, JWRN_ARITH_BAD_CODE, JWRN_JPEG_EOF, JWRN_BOGUS_PROGRESSION).
# "bad ICC marker" also starts with "Corrupt JPEG data" but only loses the colour profile; other
# warnings (unknown JFIF revision, unknown Adobe transform, odd SOS parameters) are harmless quirks of
# real cameras and encoders.
_DAMAGE_WARNING = re.compile(
    r"^(Corrupt JPEG data(?!: bad ICC marker)|Premature end of JPEG file"
    r"|Inconsistent progression sequence)"
)
# Every message text of libjpeg-turbo's warning table starts with one of these.
_LIBJPEG_WARNING = re.compile(
    r"^(Corrupt JPEG data|Premature end of JPEG file|Inconsistent progression sequence"
    r"|Invalid SOS parameters|Warning: unknown JFIF|Unknown Adobe color transform"
    r"|Application transferred too many scanlines)"
)

_CAPTURE_LOCK = threading.Lock()

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_end(data: bytes) -> int | None:
    """Offset just past the end-of-image marker of the JPEG that starts ``data``, found by walking
    its markers; None when ``data`` is no JPEG or has no end-of-image marker."""
    if not data.startswith(b"\xff\xd8"):
        return None
    pos, n = 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            # Stray bytes between segments: libjpeg skips to the next 0xFF (and warns), so do we.
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
        while pos < n and data[pos] == 0xFF:
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return pos
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0xD8):
            continue  # standalone markers carry no length
        if pos + 2 > n:
            return None
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            return None
        pos += length
        if marker == 0xDA:
            found = _NEXT_MARKER.search(data, pos)
            if found is None:
                return None
            pos = found.end() - 2  # the last 0xFF before the marker byte
    return None


def trailing_data_damage(data: bytes) -> str | None:
    """Why the bytes after a JPEG's end-of-image marker are garbage, or None when there are none or
    they are a known kind of trailer.

    Accepted trailers: padding (only 0x00 / 0xFF bytes), another JPEG (multi-picture MPO files and
    camera previews), an ISO-BMFF video (motion photos append an MP4 whose second box-header word
    is ``ftyp``) and Samsung's trailer (ending in ``SEFT``).
    """
    end = jpeg_end(data)
    if end is None:
        return "malformed JPEG: no end-of-image marker after the image data"
    tail = data[end:]
    if not tail or not tail.strip(b"\x00\xff"):
        return None
    if tail.startswith(b"\xff\xd8") or tail[4:8] == b"ftyp" or tail.endswith(b"SEFT"):
        return None
    return f"{len(tail)} bytes of trailing data after the JPEG end-of-image marker"


def libjpeg_warnings(data: bytes) -> list[str]:
    """The warnings libjpeg-turbo gives while decoding the JPEG ``data`` (empty for a clean file).

    libjpeg prints only its first warning unless traced, so at most one message is usual.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    with _CAPTURE_LOCK:
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass  # no usable Python stderr: nothing of ours to order before the capture
        try:
            saved = os.dup(2)
        except OSError:
            # No file descriptor 2 to redirect: the check cannot run, the decode is still usable.
            logger.debug("libjpeg warnings not checked: stderr is closed")
            return []
        try:
            with tempfile.TemporaryFile() as capture:
                os.dup2(capture.fileno(), 2)
                try:
                    cv2.imdecode(buf, cv2.IMREAD_REDUCED_GRAYSCALE_8)
                finally:
                    os.dup2(saved, 2)
                capture.seek(0)
                text = capture.read().decode("utf-8", errors="replace")
        finally:
            os.close(saved)
    warnings, other = [], []
    for line in text.splitlines(keepends=True):
        (warnings if _LIBJPEG_WARNING.match(line) else other).append(line)
    if other:
        # Another thread's output that landed in the capture: give it back.
        os.write(2, "".join(other).encode())
    return [w.strip() for w in warnings]


def jpeg_damage(data: bytes) -> str | None:
    """Why the JPEG ``data`` decodes with errors (corrupt entropy-coded data, a premature end,
    trailing garbage), or None for a clean file."""
    damage = [w for w in libjpeg_warnings(data) if _DAMAGE_WARNING.match(w)]
    if damage:
        return f"corrupt JPEG data (libjpeg: {damage[0]})"
    return trailing_data_damage(data)


def nonfinite_damage(img: Image.Image) -> str | None:
    """Why a float image's pixels are unusable (NaN or infinite values), or None."""
    if img.mode != "F":
        return None
    bad = int(np.count_nonzero(~np.isfinite(np.asarray(img))))
    if not bad:
        return None
    return f"{bad} of {img.width * img.height} pixels are NaN or infinite"


def png_damage(data: bytes) -> str | None:
    """Why the PNG ``data`` is damaged (a chunk whose CRC does not match its bytes, garbage after
    the IEND chunk), or None. Zero padding after IEND is accepted."""
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, n = len(_PNG_SIGNATURE), len(data)
    while pos + 12 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > n:
            return None  # truncated: the decoder has already refused it, or had all it needed
        kind = data[pos + 4 : pos + 8]
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            return f"CRC mismatch in the {kind.decode('latin-1')!r} chunk at byte {pos}"
        pos = end
        if kind == b"IEND":
            tail = data[pos:]
            if tail.strip(b"\x00"):
                return f"{len(tail)} bytes of trailing data after the PNG end chunk"
            return None
    return None


#: The formats (Pillow's names) :func:`file_damage` checks.
CHECKED_FORMATS = frozenset({"JPEG", "MPO", "PNG"})


def file_damage(image_format: str | None, data: bytes) -> str | None:
    """Why the file ``data`` of Pillow format ``image_format`` is damaged although it decodes, or
    None (also for formats without a check, see :data:`CHECKED_FORMATS`)."""
    if image_format in ("JPEG", "MPO"):
        return jpeg_damage(data)
    if image_format == "PNG":
        return png_damage(data)
    return None
