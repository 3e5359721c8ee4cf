"""The recording file: its format, its writer and its reader (no provider, no network).

A recording is UTF-8 JSON lines, append-only, optionally gzip-compressed (a name ending in
``.gz``). Version 1:

- line 1, the header::

    {"format":"trio-relay-recording","version":1,"provider":"fmp","symbols":["AAPL","MSFT"],
     "started_at":1736173800000,"raw":false,"fields":["t","symbol","kind",...]}

- then one line per normalised :class:`~trio_relay.model.Update`, an array in the order of
  ``fields``: the relay's receive time ``t`` (epoch ms), then every field of the update, with the
  trailing fields that hold their default (``null``, ``false``, ``0``) left off::

    [1736173800105,"AAPL","T",1736173800098,187.12,100]
    [1736173800105,"MSFT","Q",1736173800101,null,null,415.3,200,415.27,300]

  Updates received together share one ``t``; a reader must accept extra trailing elements
  (later versions may add fields) and missing trailing ones (their defaults).

- with ``raw`` recording, each upstream text frame as it arrived, before the updates made
  from it: ``{"raw":"<frame>","t":1736173800105}``.

All times are epoch milliseconds. ``t`` is the wall clock at the start of the recording advanced
by the (monotonic) Trio clock, so receive times never go backwards and the gaps between them are
the real gaps, which is what a replay reproduces.

Crash safety: every batch of lines is written whole, ending in ``\\n``, with one ``write()``; the
file is flushed and fsynced every second (and every :data:`SYNC_LINES` lines). A reader reads
everything up to a final partial line (skipped with a warning: the recorder was stopped
mid-write) and skips a corrupt line anywhere else (counted, with a warning). A gzip recording
is sync-flushed at each of those points, so a recording cut short still decompresses up to
its last sync; its missing gzip trailer is reported, not fatal.
"""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple

import msgspec

from ..model import Update

__all__ = [
    "FORMAT",
    "VERSION",
    "FIELDS",
    "DEMO",
    "DEMO_RESOURCE",
    "RecordingError",
    "RecordingHeader",
    "Recorded",
    "RawFrame",
    "RecordingWriter",
    "RecordingReader",
    "Recording",
    "open_recording",
    "load_recording",
    "recording_path",
]

log = logging.getLogger("trio_relay.recording")

FORMAT: Final = "trio-relay-recording"
VERSION: Final = 1


class _Line(msgspec.Struct, array_like=True, gc=False):
    """One update line: the columns of the format (version 1), in order. Changing them is a new version."""

    t: int
    symbol: str
    kind: str
    timestamp: int
    last_price: float | None = None
    last_size: float | None = None
    ask_price: float | None = None
    ask_size: float | None = None
    bid_price: float | None = None
    bid_size: float | None = None
    merged: bool = False
    provider: str | None = None
    seq: int = 0
    epoch: str | None = None


#: The columns of an update line.
FIELDS: Final = _Line.__struct_fields__
# The default of each column from "last_price" on: a line ends at its last non-default value.
_DEFAULTS: Final[tuple[object, ...]] = _Line.__struct_defaults__
_OPTIONAL_FROM: Final = len(FIELDS) - len(_DEFAULTS)

#: ``file = "demo"``: the recording shipped with the package.
DEMO: Final = "demo"
DEMO_RESOURCE: Final = "sim-demo.jsonl.gz"

READ_CHUNK: Final = 1 << 16
MAX_LINE: Final = 64 << 20  # a "line" longer than this is corrupt (a file with no newlines)
_LOG_FIRST: Final = 10  # corrupt lines: log the first few, then every 1000th


class RecordingError(Exception):
    """The file is not a readable recording (or cannot be written as asked)."""


class RecordingHeader(msgspec.Struct, kw_only=True):
    """The first line. Unknown keys are ignored (a later version may add some)."""

    format: str  # required: a JSON object without it is not a recording
    version: int
    provider: str = ""
    symbols: list[str] = msgspec.field(default_factory=list)
    started_at: int = 0  # epoch ms
    raw: bool = False  # raw upstream frames are recorded too
    fields: list[str] = msgspec.field(default_factory=lambda: list(FIELDS))

    @classmethod
    def new(cls, provider: str, symbols: Sequence[str], started_at: int, *, raw: bool = False) -> RecordingHeader:
        """The header of a recording made now, by this version."""
        return cls(
            format=FORMAT, version=VERSION, provider=provider, symbols=list(symbols), started_at=started_at, raw=raw
        )


class Recorded(NamedTuple):
    """One recorded update and the relay's receive time (epoch ms)."""

    t: int
    update: Update


class RawFrame(NamedTuple):
    """One raw upstream frame and its receive time (epoch ms)."""

    t: int
    frame: str


class _Raw(msgspec.Struct, gc=False):
    raw: str
    t: int


_ENCODER = msgspec.json.Encoder()  # stateless
_HEADER_DECODER = msgspec.json.Decoder(RecordingHeader)
_LINE_DECODER = msgspec.json.Decoder(_Line)
_RAW_DECODER = msgspec.json.Decoder(_Raw)


def _row(t: int, u: Update) -> list[object]:
    row: list[object] = [
        t,
        u.symbol,
        u.kind,
        u.timestamp,
        u.last_price,
        u.last_size,
        u.ask_price,
        u.ask_size,
        u.bid_price,
        u.bid_size,
        u.merged,
        u.provider,
        u.seq,
        u.epoch,
    ]
    n = len(row)
    while n > _OPTIONAL_FROM and _is_default(row[n - 1], _DEFAULTS[n - 1 - _OPTIONAL_FROM]):
        n -= 1
    del row[n:]
    return row


def _is_default(value: object, default: object) -> bool:
    # By type too: 0 == False, and a size of 0 must not be taken for an absent one.
    return value is default or (type(value) is type(default) and value == default)


def _update(line: _Line) -> Update:
    return Update(
        symbol=line.symbol,
        kind=line.kind,
        timestamp=line.timestamp,
        last_price=line.last_price,
        last_size=line.last_size,
        ask_price=line.ask_price,
        ask_size=line.ask_size,
        bid_price=line.bid_price,
        bid_size=line.bid_size,
        merged=line.merged,
        provider=line.provider,
        seq=line.seq,
        epoch=line.epoch,
    )


# --------------------------------------------------------------------------- writing


class RecordingWriter:
    """Appends lines to a new recording; gzip-compressed when the name ends in ``.gz``.

    Synchronous and clock-free (the caller decides when to :meth:`flush` and :meth:`fsync`), so
    it serves ``record()`` and offline tools alike. Each ``write_*`` call is one ``write()`` of
    whole lines. An existing file is refused unless ``overwrite``.
    """

    def __init__(self, path: str | Path, header: RecordingHeader, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        # Unbuffered: each write() below is one system call, so the kernel has whole lines.
        self._file = open(self.path, "wb" if overwrite else "xb", buffering=0)  # noqa: SIM115
        self._gz: gzip.GzipFile | None = None
        if self.path.name.endswith(".gz"):
            # No name and no mtime in the gzip header: the same lines give the same bytes.
            self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, mtime=0)
        self.header = header
        self.lines = 0
        self.updates = 0
        self.raw_frames = 0
        self.unsynced = 0  # lines written since the last flush()
        self._closed = False
        try:
            self._write(_ENCODER.encode(header) + b"\n", 1)
            self.sync()  # a recording that dies at once still has its header
        except BaseException:
            self._file.close()
            raise

    def _write(self, data: bytes, lines: int) -> None:
        if self._gz is not None:
            self._gz.write(data)
        else:
            view = memoryview(data)
            while view:
                written = self._file.write(view)
                view = view[written or 0 :]
        self.lines += lines
        self.unsynced += lines

    def write_updates(self, updates: Sequence[Update], t: int) -> None:
        """Write ``updates``, received at ``t`` (epoch ms), as one batch of lines."""
        if not updates:
            return
        self._write(_ENCODER.encode_lines([_row(t, u) for u in updates]), len(updates))
        self.updates += len(updates)

    def write_raw(self, frames: Sequence[str], t: int) -> None:
        """Write raw upstream ``frames``, received at ``t`` (epoch ms), as one batch of lines."""
        if not frames:
            return
        self._write(_ENCODER.encode_lines([_Raw(f, t) for f in frames]), len(frames))
        self.raw_frames += len(frames)

    def flush(self) -> None:
        """Hand everything written to the kernel (a gzip sync flush: decodable up to here)."""
        if self._gz is not None:
            self._gz.flush(zlib.Z_SYNC_FLUSH)
        self.unsynced = 0

    def fsync(self) -> None:
        """Make what was flushed durable (blocking)."""
        os.fsync(self._file.fileno())

    def sync(self) -> None:
        self.flush()
        self.fsync()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._gz is not None:
                self._gz.close()  # the gzip trailer; the file object stays ours
            self.fsync()
        finally:
            self._file.close()

    @property
    def size(self) -> int:
        """Bytes in the file so far (compressed size for gzip)."""
        return self._file.tell()

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- reading


CorruptSink = Callable[[str, bytes], None]


class _Source:
    """Lines of a plain or gzip file, tolerant of a damaged or missing end."""

    def __init__(self, path: Path, warn: Callable[[str], None], corrupt: CorruptSink) -> None:
        self._file = open(path, "rb")  # noqa: SIM115  (closed by close())
        self._warn = warn
        self._corrupt = corrupt
        self.cut_short = False  # a gzip stream without its end, or damaged compressed data
        self.gzip = self._file.read(2) == b"\x1f\x8b"
        self._file.seek(0)

    def close(self) -> None:
        self._file.close()

    def _chunks(self) -> Iterator[bytes]:
        read = self._file.read
        if not self.gzip:
            while chunk := read(READ_CHUNK):
                yield chunk
            return
        # zlib directly rather than gzip.GzipFile: a stream cut short then yields everything
        # it holds instead of raising EOFError, and concatenated members are read in turn.
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        in_member = False
        while chunk := read(READ_CHUNK):
            while chunk:
                in_member = True
                try:
                    data = inflate.decompress(chunk)
                except zlib.error as exc:
                    self.cut_short = True
                    self._warn(f"compressed data is damaged ({exc}); reading stops there")
                    return
                if data:
                    yield data
                if not inflate.eof:
                    break
                chunk = inflate.unused_data
                inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                in_member = False
                if not chunk.strip(b"\x00"):
                    chunk = b""  # zero padding after the last member
        if in_member:
            tail = inflate.flush()
            if tail:
                yield tail
            self.cut_short = True
            self._warn("the compressed stream ends early (no gzip trailer): the recorder was stopped abruptly")

    def lines(self) -> Iterator[tuple[bytes, bool]]:
        """Each line without its newline, and whether a newline ended it (only the last may not)."""
        pieces: list[bytes] = []  # the start of the current line, from earlier chunks
        size = 0
        skipping = False  # inside a line found too long: dropped up to its newline
        for chunk in self._chunks():
            parts = chunk.split(b"\n")
            if len(parts) > 1:
                first = parts[0]
                if skipping:
                    skipping = False
                else:
                    yield (b"".join(pieces) + first if pieces else first), True
                for line in parts[1:-1]:
                    yield line, True
                pieces, size = [], 0
            last = parts[-1]
            if last and not skipping:
                pieces.append(last)
                size += len(last)
                if size > MAX_LINE:
                    self._corrupt(f"longer than {MAX_LINE} bytes", pieces[0][:200])
                    pieces, size, skipping = [], 0, True
        if pieces:
            yield b"".join(pieces), False


class RecordingReader:
    """Reads a recording: its :attr:`header` at once, then its entries in order.

    ``corrupt`` counts the lines skipped because they could not be decoded; ``truncated`` says
    the file ended in a partial line (or a cut-short gzip stream). Warnings go to the
    ``trio_relay.recording`` logger, or corrupt lines to ``on_corrupt(reason, line)`` when given.
    ``quiet`` silences the warnings (the counters still count).
    """

    def __init__(self, path: str | Path, *, on_corrupt: CorruptSink | None = None, quiet: bool = False) -> None:
        self.path = Path(path)
        self.corrupt = 0
        self._partial_tail = False
        self.line_no = 0
        self._on_corrupt = on_corrupt
        self._quiet = quiet
        self._source = _Source(self.path, self._warn, self._corrupt)
        try:
            self._lines = self._source.lines()
            self.header = self._read_header()
        except BaseException:
            self._source.close()
            raise

    @property
    def truncated(self) -> bool:
        return self._partial_tail or self._source.cut_short

    def _warn(self, message: str) -> None:
        if not self._quiet:
            log.warning("[RECORDING] %s: %s", self.path.name, message)

    def _read_header(self) -> RecordingHeader:
        for line, terminated in self._lines:
            self.line_no += 1
            if not line.strip():
                continue
            try:
                header = _HEADER_DECODER.decode(line)
            except msgspec.DecodeError:
                what = "a partial header" if not terminated else "no trio-relay recording header"
                raise RecordingError(f"{self.path}: {what} (not a recording?)") from None
            if header.format != FORMAT:
                raise RecordingError(f"{self.path}: format {header.format!r} is not {FORMAT!r}")
            if header.version > VERSION:
                raise RecordingError(
                    f"{self.path}: version {header.version} is newer than this relay reads ({VERSION})"
                )
            return header
        raise RecordingError(f"{self.path}: empty file (no recording header)")

    def _corrupt(self, reason: str, line: bytes) -> None:
        self.corrupt += 1
        if self._on_corrupt is not None:
            self._on_corrupt(f"line {self.line_no}: {reason}", line)
        elif not self._quiet and (self.corrupt <= _LOG_FIRST or self.corrupt % 1000 == 0):
            name, n = self.path.name, self.corrupt
            log.warning(
                "[RECORDING] %s: corrupt line %d skipped (#%d: %s): %.120r", name, self.line_no, n, reason, line
            )

    def __iter__(self) -> Iterator[Recorded | RawFrame]:
        """Every update and raw frame, in file order."""
        for line, terminated in self._lines:
            self.line_no += 1
            if not line.strip():
                continue
            try:
                if line[:1] == b"[":
                    entry: Recorded | RawFrame = _as_recorded(_LINE_DECODER.decode(line))
                else:
                    raw = _RAW_DECODER.decode(line)
                    entry = RawFrame(raw.t, raw.raw)
            except msgspec.DecodeError as exc:
                if terminated:
                    self._corrupt(str(exc), line)
                else:
                    self._partial_tail = True
                    self._warn(
                        f"final partial line {self.line_no} ({len(line)} bytes) skipped: the recording was cut short"
                    )
                continue
            yield entry

    def updates(self) -> Iterator[Recorded]:
        """Every update in file order (raw frames skipped)."""
        for entry in self:
            if isinstance(entry, Recorded):
                yield entry

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> RecordingReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _as_recorded(line: _Line) -> Recorded:
    return Recorded(line.t, _update(line))


@contextmanager
def recording_path(file: str | Path) -> Iterator[Path]:
    """The path of ``file``; ``"demo"`` is the recording shipped with the package."""
    if isinstance(file, str) and file == DEMO:
        resource = importlib.resources.files("trio_relay.demo") / DEMO_RESOURCE
        with importlib.resources.as_file(resource) as path:
            yield path
    else:
        yield Path(file).expanduser()


@contextmanager
def open_recording(
    file: str | Path, *, on_corrupt: CorruptSink | None = None, quiet: bool = False
) -> Iterator[RecordingReader]:
    """``with open_recording(path) as reader:`` (``"demo"``: the shipped recording)."""
    with recording_path(file) as path, RecordingReader(path, on_corrupt=on_corrupt, quiet=quiet) as reader:
        yield reader


class Recording(NamedTuple):
    header: RecordingHeader
    updates: list[Recorded]
    raw: list[RawFrame]
    corrupt: int
    truncated: bool


def load_recording(file: str | Path) -> Recording:
    """A whole recording in memory (for small files, tools and tests)."""
    updates: list[Recorded] = []
    raw: list[RawFrame] = []
    with open_recording(file) as reader:
        for entry in reader:
            if isinstance(entry, Recorded):
                updates.append(entry)
            else:
                raw.append(entry)
        return Recording(reader.header, updates, raw, reader.corrupt, reader.truncated)


# --------------------------------------------------------------------------- recording
