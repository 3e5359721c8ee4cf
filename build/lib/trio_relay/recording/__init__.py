"""Recordings of an upstream feed: the file (:mod:`.file`) and the recorder (:mod:`.record`).

``file`` is the data layer (format, writer, reader) that the replay provider and the demo use;
``record`` runs a provider into a file and is the ``trio-relay record`` command. Only the data
layer is re-exported here, so reading a recording never imports the upstream machinery.
"""

from .file import (
    DEMO,
    DEMO_RESOURCE,
    FIELDS,
    FORMAT,
    VERSION,
    RawFrame,
    Recorded,
    Recording,
    RecordingError,
    RecordingHeader,
    RecordingReader,
    RecordingWriter,
    load_recording,
    open_recording,
    recording_path,
)

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
