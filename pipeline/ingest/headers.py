"""Detached headers (MetaImage .mhd/.mha, NRRD .nrrd/.nhdr) parsed the way ITK parses them.

A detached header names the file its voxels live in, and SimpleITK opens whatever it names:
`data file: /etc/passwd` in an .nhdr converts the password file. So before ITK sees a header,
`check_header_file` (on disk, for images and label maps alike, and for the copies extracted
from zips) and `zip_data_members` (inside an archive) find the data file the same way ITK
will and refuse it unless it resolves, after symlinks, inside the scan's own folder (or among
the archive's members).

"The same way ITK will" is the point: Python's `splitlines` also splits on form feeds and
other control bytes, ITK's MetaIO splits only on '\\n' (a key also ends at '\\r'), NRRD's
reader on '\\n', '\\r' and '\\r\\n'; MetaIO takes ':' as well as '=' as separator, skips runs
of separators before a value, and lets a numeric array with too few values read on into the
next line. Rather than reproduce every quirk, the parser here accepts only headers on which
these readings cannot differ (printable ASCII lines, every line a field, numeric fields with
exactly their values) and refuses the rest with the line and the reason.

The numbers are checked too, because ITK turns some of them into plausible lies: an origin of
`inf` reads as 0, a negative DimSize wraps around. A bad number is refused with its field and
value.
"""

from __future__ import annotations

import math
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from pipeline.ingest.limits import LimitError, check_ceiling, human_bytes

__all__ = ["Header", "header_format", "parse_header_bytes", "read_header", "check_header_file",
           "zip_data_members", "HEADER_READ_BYTES"]

HEADER_READ_BYTES = 1 << 20
"""Headers are read up to 1 MiB; a header still unfinished by then is refused."""
_MAX_LINE = 499  # MetaIO reads a line into a 500-byte buffer; a longer line derails its parser

METAIMAGE_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                           "MET_UINT": 4, "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8,
                           "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}
_MHD_LOCAL = ("Local", "LOCAL", "local")  # exactly the spellings MetaIO treats as "data follows"
# MetaIO's numeric fields (metaObject.cxx / metaImage.cxx M_SetupReadFields) and how many values each holds
_MHD_INTS = {"NDims", "FileFormatVersion", "ID", "ParentID", "HeaderSize", "ElementNumberOfChannels",
             "ElementNBits", "CompressedDataSize"}
_MHD_FLOATS = {"ElementMin", "ElementMax", "ElementToIntensityFunctionSlope", "ElementToIntensityFunctionOffset"}
_MHD_INT_ARRAYS = {"DimSize", "SequenceID"}
_MHD_FLOAT_ARRAYS = {"Position", "Origin", "Offset", "CenterOfRotation", "ElementSpacing", "ImagePosition",
                     "ElementOrigin", "ElementSize"}
_MHD_MATRICES = {"TransformMatrix", "Rotation", "Orientation", "ElementDirection"}
_MHD_ORIGINS = ("Offset", "Origin", "Position", "ImagePosition", "ElementOrigin")
_INT = re.compile(r"[+-]?\d+")
# what C++ `stream >> double` accepts; "inf"/"nan" are not numbers to it (it stores 0 instead)
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")

_NRRD_MAGIC = re.compile(rb"NRRD000[1-5]")
_NRRD_TYPES = {1: ("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"),
               2: ("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                   "unsigned short", "unsigned short int", "uint16", "uint16_t"),
               4: ("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"),
               8: ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                   "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                   "double")}
_NRRD_TYPE_BYTES = {name: n for n, names in _NRRD_TYPES.items() for name in names}


@dataclass(frozen=True)
class Header:
    """What a header says about where its voxels are and how many bytes they take."""

    name: str
    format: str
    """metaimage or nrrd."""
    data_names: tuple[str, ...]
    """Data files as the header names them (relative to its folder); () when the voxels follow the header."""
    expected_bytes: int
    """Decoded voxel bytes: the product of the sizes times the element size."""
    skip_bytes: int
    """Bytes before the voxels in the data file (HeaderSize / byte skip); -1: the voxels end the file."""
    compressed: bool
    header_end: int
    """Offset of the first byte after the header text."""
    line_skip: int = 0
    """Lines skipped in the data file before the byte skip (NRRD line skip); each takes at least a byte."""

    @property
    def skip_field(self) -> str:
        return "HeaderSize" if self.format == "metaimage" else "byte skip"


def header_format(name: str) -> str | None:
    """The detached-header format of a file name: metaimage, nrrd, or None (not one)."""
    low = name.lower()
    if low.endswith((".mhd", ".mha")):
        return "metaimage"
    if low.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    return None


def _lines(head: bytes, name: str, splitter: re.Pattern):
    """Yield (end-after-terminator, text) of each terminated line, lazily (the voxels after an
    attached header are not text); refuses bytes on which line readers disagree."""
    pos, count = 0, 0
    for m in splitter.finditer(head):
        raw = head[pos:m.start()]
        count += 1
        bad = re.search(rb"[^\x20-\x7e\t]", raw)
        if bad:
            byte = raw[bad.start()]
            raise ValueError(f"header {name} does not parse: line {count} has byte 0x{byte:02x} at offset "
                             f"{pos + bad.start()}, not printable text (ITK and other readers split such lines "
                             f"differently)")
        if len(raw) > _MAX_LINE:
            raise ValueError(f"header {name} line {count} is {len(raw)} characters long (ITK reads at most "
                             f"{_MAX_LINE})")
        yield m.end(), raw.decode("ascii")
        pos = m.end()


def _numbers(name: str, key: str, value: str, count: int, integer: bool) -> list[float]:
    tokens = value.split()
    if len(tokens) != count:
        raise ValueError(f"header {name}: {key} = {value!r} has {len(tokens)} values, expected {count}")
    out = []
    for t in tokens:
        if not (_INT if integer else _FLOAT).fullmatch(t):
            raise ValueError(f"header {name}: {key} value {t!r} is not a{'n integer' if integer else ' number'}")
        v = int(t) if integer else float(t)
        if not integer and not math.isfinite(v):
            raise ValueError(f"header {name}: {key} value {t!r} overflows (not a finite number)")
        out.append(v)
    return out


def _metaimage(head: bytes, name: str, complete: bool, max_scan_bytes: int) -> Header:
    fields: dict[str, str] = {}
    numbers: dict[str, list[float]] = {}
    # MetaIO: a line ends at '\n' ('\r\n' is '\n' after a value is stripped); a lone '\r' would
    # end a key but not a value, so _lines refuses it as a non-printable byte
    end = None
    for stop, text in _lines(head, name, re.compile(rb"\r?\n")):
        if not text.strip(" \t"):
            continue
        sep = re.search(r"[=:]", text)
        if sep is None:
            raise ValueError(f"header {name} does not parse: line {text.strip()[:60]!r} has no '='")
        key = text[:sep.start()].strip(" \t")
        if not re.match(r"[A-Za-z]", key):
            raise ValueError(f"header {name} does not parse: line {text.strip()[:60]!r} does not start with a "
                             f"field name")
        value = text[sep.start():].lstrip("=: \t").rstrip(" \t")
        fields[key] = value
        if key in _MHD_INTS or key in _MHD_FLOATS:
            numbers[key] = _numbers(name, key, value, 1, key in _MHD_INTS)
        elif key in _MHD_INT_ARRAYS | _MHD_FLOAT_ARRAYS | _MHD_MATRICES or key == "Color":
            if key != "Color" and "NDims" not in numbers:
                raise ValueError(f"header {name}: {key} comes before NDims")
            n = 4 if key == "Color" else int(numbers["NDims"][0])
            numbers[key] = _numbers(name, key, value, n * n if key in _MHD_MATRICES else n, key in _MHD_INT_ARRAYS)
        if key == "ElementDataFile":
            end = stop
            break
    if end is None:
        more = "" if complete else f" within its first {HEADER_READ_BYTES} bytes"
        raise ValueError(f"header {name} does not parse: no ElementDataFile field{more}")
    for key in ("NDims", "DimSize", "ElementType"):
        if key not in fields:
            raise ValueError(f"header {name} does not parse: no {key} field")
    ndims = int(numbers["NDims"][0])
    dims = [int(d) for d in numbers["DimSize"]]
    if ndims != 3:
        raise ValueError(f"header {name}: expected a 3-D image, NDims={ndims} DimSize={dims}")
    for d in dims:
        if d < 1:
            raise ValueError(f"header {name}: DimSize value {d} must be a positive size (DimSize = {fields['DimSize']})")
    for key in ("ElementSpacing", "ElementSize"):
        for v in numbers.get(key, []):
            if not v > 0:
                raise ValueError(f"header {name}: {key} value {v:g} must be positive ({key} = {fields[key]})")
    for key in sorted(_MHD_MATRICES & numbers.keys()):
        m = numbers[key]
        _check_direction(name, f"{key} = {fields[key]}", [m[0:3], m[3:6], m[6:9]])
    etype = fields["ElementType"]
    if etype not in METAIMAGE_ELEMENT_BYTES:
        raise ValueError(f"header {name}: unknown ElementType {etype!r}")
    channels = int(numbers.get("ElementNumberOfChannels", [1])[0])
    if channels < 1:
        raise ValueError(f"header {name}: ElementNumberOfChannels value {channels} must be at least 1")
    skip = int(numbers.get("HeaderSize", [0])[0])
    if skip < -1:
        raise ValueError(f"header {name}: HeaderSize value {skip} is negative")
    if numbers.get("CompressedDataSize", [0])[0] < 0:
        raise ValueError(f"header {name}: CompressedDataSize value {fields['CompressedDataSize']} is negative")
    expected = math.prod(dims) * channels * METAIMAGE_ELEMENT_BYTES[etype]
    check_ceiling(f"header {name} ({'x'.join(map(str, dims))} {etype})", expected, max_scan_bytes)
    data = fields["ElementDataFile"]
    if data in _MHD_LOCAL:
        names: tuple[str, ...] = ()
        if 0 < skip < end:  # MetaIO seeks to HeaderSize from the file's start: into the header text
            raise ValueError(f"header {name}: HeaderSize {skip} is inside the {end}-byte header text (the voxels "
                             f"of ElementDataFile = {data} start at byte {end} or later)")
    elif data.startswith("LIST") or "%" in data:
        raise ValueError(f"header {name}: multi-file ElementDataFile {data!r} is not supported")
    else:
        names = (data,)
    return Header(name=name, format="metaimage", data_names=names, expected_bytes=expected, skip_bytes=skip,
                  compressed=fields.get("CompressedData", "False").lower() == "true", header_end=end)


def _check_direction(name: str, what: str, vectors: list[list[float]]) -> None:
    """Refuse a direction matrix with a zero or dependent axis: ITK refuses it with its own
    trace ("Bad direction, determinant is 0"), and no scan has such an orientation."""
    unit = []
    for v in vectors:
        norm = math.sqrt(sum(x * x for x in v))
        unit.append([x / norm for x in v] if norm > 0 else [0.0] * len(v))
    (a, b, c), (d, e, f), (g, h, i) = unit
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    if abs(det) < 1e-6:
        raise ValueError(f"header {name}: {what} is not an invertible direction matrix (determinant {det:g}: an "
                         f"axis is zero or parallel to another), so the image has no orientation")


def _nrrd_vector(name: str, key: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.strip("() \t").split(",")]
    except ValueError:
        raise ValueError(f"header {name}: {key} vector {text!r} is not a list of numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"header {name}: {key} {text!r} has a value that is not finite")
    return values


def _nrrd(head: bytes, name: str, complete: bool, max_scan_bytes: int) -> Header:
    if not _NRRD_MAGIC.match(head):
        raise ValueError(f"header {name} does not parse: not a NRRD file (no NRRD000N magic)")
    fields: dict[str, str] = {}
    data_lines: list[str] = []
    if complete and not head.endswith((b"\n", b"\r")):
        head += b"\n"  # a last line without a line end is still read (NrrdIO versions differ on it)
    lines = _lines(head, name, re.compile(rb"\r\n|\r|\n"))  # teem's airOneLine
    next(lines, None)  # the magic line
    end = None
    for stop, text in lines:
        if text == "":
            end = stop
            break
        if text.startswith("#"):
            continue
        colon = text.find(": ")
        field = text[:colon].lower() if colon >= 0 else None
        if field is not None and re.sub(r"\s", "", field) == "datafile":  # "data file" and "datafile"
            data_lines.append(text[colon + 2:].lstrip(" \t"))
        elif field is not None and not (":=" in text and field not in _NRRD_FIELDS):
            fields[field] = text[colon + 2:].strip(" \t")
        elif ":=" not in text:
            raise ValueError(f"header {name} does not parse: line {text[:60]!r} is neither 'field: value' "
                             f"nor 'key:=value'")
    if end is None:
        if not complete:
            raise ValueError(f"header {name}: no end of header within its first {HEADER_READ_BYTES} bytes")
        end = len(head)
    dimension = fields.get("dimension")
    if dimension is None or not _INT.fullmatch(dimension):
        raise ValueError(f"header {name} does not parse: dimension {dimension!r}")
    n = int(dimension)
    if "sizes" not in fields:
        raise ValueError(f"header {name} does not parse: no sizes field")
    sizes = _numbers(name, "sizes", fields["sizes"], n, integer=True)
    for s in sizes:
        if s < 1:
            raise ValueError(f"header {name}: sizes value {s} must be a positive size (sizes: {fields['sizes']})")
    type_name = " ".join(fields.get("type", "").lower().split())
    if type_name not in _NRRD_TYPE_BYTES:
        raise ValueError(f"header {name}: unknown or unsupported type {fields.get('type')!r}")
    if "spacings" in fields:
        for t in fields["spacings"].split():
            v = float(t) if _FLOAT.fullmatch(t) else math.nan
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"header {name}: spacings value {t!r} must be a positive finite number")
    for key in ("space directions", "spacedirections"):
        vectors = []
        for vec in re.findall(r"\([^)]*\)", fields.get(key, "")):
            vectors.append(_nrrd_vector(name, "space directions", vec))
            if not any(vectors[-1]):
                raise ValueError(f"header {name}: space directions vector {vec} is zero (zero spacing)")
        if len(vectors) == 3 and all(len(v) == 3 for v in vectors):
            _check_direction(name, f"space directions: {fields[key]}", vectors)
    for key in ("space origin", "spaceorigin"):
        if key in fields:
            _nrrd_vector(name, "space origin", fields[key])
    expected = math.prod(int(s) for s in sizes) * _NRRD_TYPE_BYTES[type_name]
    check_ceiling(f"header {name} ({'x'.join(str(int(s)) for s in sizes)} {type_name})", expected, max_scan_bytes)
    skip = fields.get("byte skip", fields.get("byteskip", "0"))
    if not _INT.fullmatch(skip) or int(skip) < -1:
        raise ValueError(f"header {name}: byte skip value {skip!r} is not -1 or a byte count")
    line_skip = fields.get("line skip", fields.get("lineskip", "0"))
    if not _INT.fullmatch(line_skip) or int(line_skip) < 0:
        raise ValueError(f"header {name}: line skip value {line_skip!r} is not a number of lines")
    for data in data_lines:
        if data.upper().startswith("LIST") or "%" in data:
            raise ValueError(f"header {name}: multi-file data file {data!r} is not supported")
    if len(data_lines) > 1:
        raise ValueError(f"header {name}: {len(data_lines)} 'data file' fields")
    encoding = fields.get("encoding", "raw").lower()
    if int(skip) == -1 and encoding != "raw":  # the NRRD format: -1 ("the voxels end the file") is for raw only
        raise ValueError(f"header {name}: byte skip -1 is allowed only with raw encoding (encoding: {encoding})")
    return Header(name=name, format="nrrd", data_names=tuple(data_lines), expected_bytes=expected,
                  skip_bytes=int(skip), compressed=encoding not in ("raw", "txt", "text", "ascii"), header_end=end,
                  line_skip=int(line_skip))


_NRRD_FIELDS = {"content", "number", "type", "block size", "blocksize", "dimension", "space", "space dimension",
                "spacedimension", "sizes", "spacings", "thicknesses", "axis mins", "axismins", "axis maxs",
                "axismaxs", "space directions", "spacedirections", "centers", "centerings", "kinds", "labels",
                "units", "min", "max", "old min", "oldmin", "old max", "oldmax", "endian", "encoding",
                "line skip", "lineskip", "byte skip", "byteskip", "sample units", "sampleunits", "space units",
                "spaceunits", "space origin", "spaceorigin", "measurement frame", "measurementframe",
                "data file", "datafile"}


def parse_header_bytes(head: bytes, name: str, fmt: str, complete: bool,
                       max_scan_bytes: int) -> Header:
    """Parse the first bytes of a header (`complete`: they are the whole file)."""
    if fmt == "metaimage":
        return _metaimage(head, name, complete, max_scan_bytes)
    return _nrrd(head, name, complete, max_scan_bytes)


def _regular(path: str, what: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"cannot read {what}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{what} is not a regular file")
    return st


def read_header(path: str, max_scan_bytes: int) -> Header:
    """Parse a header file on disk (only its first `HEADER_READ_BYTES`)."""
    name = os.path.basename(path)
    fmt = header_format(name)
    if fmt is None:
        raise ValueError(f"{name} is not a MetaImage or NRRD header")
    size = _regular(path, f"header {name}").st_size
    with open(path, "rb") as fh:
        head = fh.read(HEADER_READ_BYTES)
    return parse_header_bytes(head, name, fmt, size <= HEADER_READ_BYTES, max_scan_bytes)


def _data_name_parts(header: Header, data: str) -> tuple[str, ...]:
    """The relative path parts of a data file name; refuses names that leave the header's folder."""
    if data.strip(" \t") != data or not data:
        raise ValueError(f"header {header.name}: data file name {data!r} is empty or has surrounding spaces")
    if data.startswith(("/", "~", "\\")) or re.match(r"^[A-Za-z]:", data):
        raise ValueError(f"header {header.name}: data file {data!r} points outside the scan's folder "
                         f"(absolute path)")
    parts = PurePosixPath(data).parts
    if ".." in parts or "\\" in data:
        raise ValueError(f"header {header.name}: data file {data!r} points outside the scan's folder")
    return parts


def _voxels_end(header: Header) -> int | None:
    """Bytes a header file with its voxels inside (.mha LOCAL, attached .nrrd) must hold; None when
    the voxels are elsewhere or compressed. With a line skip, or a skip of -1 (the voxels end the
    file, and must not reach back into the header text), it is a least count (a skipped line
    takes at least a byte)."""
    if header.data_names or header.compressed:
        return None
    if header.format == "metaimage" and header.skip_bytes > 0:  # MetaIO: HeaderSize counts from the file start
        return header.skip_bytes + header.expected_bytes
    return header.header_end + header.line_skip + max(header.skip_bytes, 0) + header.expected_bytes


def _voxels_exact(header: Header) -> bool:
    """Whether `_voxels_end` is the file's exact size (no line skip, no skip of -1)."""
    return not header.line_skip and header.skip_bytes >= 0


def _short_image(header: Header, size: int, need: int) -> str:
    """Why a header file with its voxels inside is too small, naming the field that places them."""
    name, field, skip = header.name, header.skip_field, header.skip_bytes
    if skip < 0:
        return (f"header {name}: {field} -1 (the voxels end the file) puts the {header.expected_bytes} voxel bytes "
                f"inside the {header.header_end}-byte header: the file holds {size} bytes, needs at least {need}")
    if skip > 0:
        after = "" if header.format == "metaimage" else f" after the {header.header_end}-byte header"
        return (f"header {name}: {field} {skip}{after} and {header.expected_bytes} voxel bytes need {need} "
                f"bytes, but the file holds {size}")
    return f"truncated image {name}: {size} bytes, the header needs {need}"


def _data_file_need(header: Header) -> tuple[int, bool]:
    """(Least size a detached data file must have, whether that size is exact).

    Lines skipped (NRRD line skip) come first and take a byte each at the least; then the
    byte skip (or HeaderSize) and the voxels, unless the data is compressed (its size is then
    unknown) or the voxels end the file (skip -1)."""
    need = header.line_skip
    if not header.compressed:
        need += header.expected_bytes + max(header.skip_bytes, 0)
    return need, not header.compressed and header.skip_bytes >= 0 and header.line_skip == 0


def _check_data_size(header: Header, data: str, size: int) -> None:
    """Refuse a data file too small for what its header says to skip and read, naming the field."""
    need, _ = _data_file_need(header)
    if size >= need:
        return
    if header.line_skip > size:
        raise ValueError(f"header {header.name}: line skip {header.line_skip} is more lines than data file {data} "
                         f"({size} bytes) can hold; each skipped line takes at least one byte")
    if header.skip_bytes > size:
        raise ValueError(f"header {header.name}: {header.skip_field} {header.skip_bytes} is past the end of data "
                         f"file {data} ({size} bytes)")
    if header.skip_bytes > 0 and not header.line_skip:
        raise ValueError(f"header {header.name}: {header.skip_field} {header.skip_bytes} and "
                         f"{header.expected_bytes} voxel bytes need {need} bytes, but data file {data} holds {size}")
    if header.line_skip:
        skip = max(header.skip_bytes, 0)
        raise ValueError(f"data file {data} is {size} bytes, too small for header {header.name}: line skip "
                         f"{header.line_skip} (a byte a line at least), {header.skip_field} {skip} "
                         f"and {header.expected_bytes} voxel bytes need at least {need}")
    raise ValueError(f"truncated data file {data}: {size} bytes, header {header.name} needs {need}")


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_header_file(path: str, max_scan_bytes: int) -> tuple[Header, list[str]]:
    """The one check of a detached header on disk: (header, [header path, data paths...]).

    Each data file must resolve, after symlinks, inside the folder that holds the header, be a
    regular file, and (uncompressed) hold the bytes the header needs. MetaIO also tries the
    name with .gz and .Z appended when the name itself does not open, so those must obey the
    same rule wherever they exist.
    """
    header = read_header(path, max_scan_bytes)
    folder_given = os.path.dirname(path)
    if "\\" in folder_given:  # MetaIO cuts the header's path at the last '/' or '\\'
        raise ValueError(f"header {header.name}: its folder name contains a backslash")
    folder = os.path.realpath(folder_given or ".")
    files = [path]
    for data in header.data_names:
        parts = _data_name_parts(header, data)
        given = os.path.join(folder_given, *parts)
        variants = [given] + ([given + ".gz", given + ".Z"] if header.format == "metaimage" else [])
        for candidate in variants:
            if candidate != given and not os.path.lexists(candidate):
                continue
            real = os.path.realpath(candidate)
            if not _inside(real, folder):
                raise ValueError(f"header {header.name}: data file {os.path.basename(candidate)} resolves to "
                                 f"{real}, outside the scan's folder {folder}")
        if not os.path.lexists(given):
            raise ValueError(f"data file {data} named by {header.name} is missing")
        st = _regular(given, f"data file {data} named by {header.name}")
        _check_data_size(header, data, st.st_size)
        files.append(given)
    need = _voxels_end(header)
    if need is not None and os.path.getsize(path) < need:
        raise ValueError(_short_image(header, os.path.getsize(path), need))
    return header, files


def zip_data_members(zf: zipfile.ZipFile, member: str, header: Header,
                     max_scan_bytes: int) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The members holding a zipped header's data, with their path relative to the header's folder.

    Checked before anything is extracted: the member must exist, and its declared size must
    match what the header needs (uncompressed data) and stay under the per-scan ceiling.
    """
    prefix = PurePosixPath(member).parent
    out = []
    total = zf.getinfo(member).file_size
    need = _voxels_end(header)
    if need is not None and (total < need or total > need and _voxels_exact(header)):
        if total < need:
            raise ValueError(_short_image(header, total, need))
        raise LimitError(f"member {member!r} declares {total} bytes ({human_bytes(total)}) but its header needs "
                         f"{need} ({human_bytes(need)}); not extracted")
    for data in header.data_names:
        parts = _data_name_parts(header, data)
        name = str(prefix.joinpath(*parts)) if str(prefix) != "." else "/".join(parts)
        try:
            info = zf.getinfo(name)
        except KeyError:
            raise ValueError(f"data file {data} named by {header.name} is missing from "
                             f"{os.path.basename(zf.filename or '')}") from None
        if info.is_dir():
            raise ValueError(f"data file {data} named by {header.name} is a folder")
        _check_data_size(header, data, info.file_size)
        need, exact = _data_file_need(header)
        if exact and info.file_size > need:
            raise LimitError(f"member {name!r} declares {info.file_size} bytes ({human_bytes(info.file_size)}) "
                             f"but header {header.name} needs {need} ({human_bytes(need)}); not extracted")
        total += info.file_size
        out.append((info, parts))
    check_ceiling(f"scan {header.name} (declared sizes of its archive members)", total, max_scan_bytes)
    return out
