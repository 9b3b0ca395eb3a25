"""gevent_fastcgi: a FastCGI application server for Python, built on gevent.

A web server (nginx, Apache, HAProxy...) speaks FastCGI to it; it runs WSGI
applications or request handlers, a greenlet a request, in one or several
processes.  One file, to vendor by copying.  It reads top to bottom in
numbered sections (grep "# 4."), each with its budget of lines (4,600 in all);
a section uses only what the sections above it define, and the tests carry the
same banners in the same order.

    1. Imports, version, logger                                       82
    2. Protocol constants (the FastCGI 1.0 specification's names)     43
    3. Errors                                                         31
    4. Record codec: bytes in, records out, bytes back; no I/O       304
    5. Request streams: stdin/data (spooled to disk), stdout/stderr  405
    6. Requests: running, shedding, timing one; our error pages      481
    7. Connections: the transport, and the greenlet that reads one   426
    8. Request handlers: WSGI (our own PEP 3333 driver), wsgiref     313
    9. Options and applications: the one table of settings           334
   10. Listening sockets                                             230
   11. Prefork master and workers: the Arbiter, worker_main()        528
   12. FastCGIServer, and the seam every watcher listens on          301
   13. Seeing inside: status page, metrics, access log, slow log     562
   14. Running a server: run_server, pid file, PasteDeploy runners    91
   15. The built-in FastCGI client and the demo application           55
   16. Command line                                                  235
   17. Django management command                                      97
   18. Optional zope.interface declarations                           39
   19. Compatibility with the original project (acts when called)     43

Importing it changes nothing outside it (monkey-patching, sys.modules, any
process-wide setting).  The FastCGI 1.0 specification is the authority.
"""


# 1. Imports, version, logger -------------------------------------------------

import bisect
import collections
import contextvars
import errno
import faulthandler
import itertools
import logging
import os
import random
import re
import signal
import socket as _stdlib_socket
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
import weakref
from contextlib import suppress
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple
from wsgiref.handlers import BaseCGIHandler
from wsgiref.util import FileWrapper

import gevent
import gevent.event
import greenlet
import gevent.lock
import gevent.os
import gevent.pool
import gevent.socket
from gevent.server import StreamServer

# A literal, so that a vendored copy of this file knows its version uninstalled.
__version__ = '2.0.0'

__all__ = [
    'FastCGIServer', 'WSGIRequestHandler', 'WSGIRefRequestHandler', 'Request',
    'Connection', 'RecordParser', 'Record', 'InputStream', 'OutputStream',
    'FastCGIError', 'ProtocolError', 'ConnectionClosed', 'RequestAborted',
    'encode_records', 'encode_pairs', 'decode_pairs']

logger = logging.getLogger('gevent_fastcgi')


# 2. Protocol constants -------------------------------------------------------

FCGI_LISTENSOCK_FILENO = 0
FCGI_HEADER_LEN = 8
FCGI_VERSION_1 = 1
FCGI_MAX_CONTENT_LEN = 0xFFFF
FCGI_NULL_REQUEST_ID = 0

# Record types (section 8).
FCGI_BEGIN_REQUEST = 1
FCGI_ABORT_REQUEST = 2
FCGI_END_REQUEST = 3
FCGI_PARAMS = 4
FCGI_STDIN = 5
FCGI_STDOUT = 6
FCGI_STDERR = 7
FCGI_DATA = 8
FCGI_GET_VALUES = 9
FCGI_GET_VALUES_RESULT = 10
FCGI_UNKNOWN_TYPE = 11
FCGI_MAXTYPE = FCGI_UNKNOWN_TYPE

# FCGI_BEGIN_REQUEST flags and roles.
FCGI_KEEP_CONN = 1
FCGI_RESPONDER = 1
FCGI_AUTHORIZER = 2
FCGI_FILTER = 3

# FCGI_END_REQUEST protocol statuses.
FCGI_REQUEST_COMPLETE = 0
FCGI_CANT_MPX_CONN = 1
FCGI_OVERLOADED = 2
FCGI_UNKNOWN_ROLE = 3

# Names FCGI_GET_VALUES may ask about (section 4.1).
FCGI_MAX_CONNS = 'FCGI_MAX_CONNS'
FCGI_MAX_REQS = 'FCGI_MAX_REQS'
FCGI_MPXS_CONNS = 'FCGI_MPXS_CONNS'

ROLE_NAMES = {FCGI_RESPONDER: 'RESPONDER', FCGI_AUTHORIZER: 'AUTHORIZER',
              FCGI_FILTER: 'FILTER'}


# 3. Errors -------------------------------------------------------------------

class FastCGIError(Exception):
    """Base class of the errors this module raises."""


class ProtocolError(FastCGIError):
    """The peer sent bytes that are not valid FastCGI: the connection that
    carried them is closed with one log line, nothing else."""


class ConnectionClosed(FastCGIError, ConnectionAbortedError):
    """Output could not be sent: the connection is gone, or the request has
    ended.  A ConnectionAbortedError, which frameworks already cope with."""


class RequestTimeout(gevent.Timeout):
    """Raised inside a request's greenlet that ran past request_timeout."""


class RequestAborted(gevent.GreenletExit):
    """Raised inside a request's greenlet when the web server aborts it or
    drops its connection; a BaseException, which ``except Exception`` in
    application code does not swallow."""


class StartupError(FastCGIError):
    """The server cannot start (an address in use, a failed on_starting or
    when_ready hook...): raised before it serves, never after."""


# 4. Record codec -------------------------------------------------------------
#
# Sans-I/O, after h11: RecordParser.feed() takes whatever bytes arrived and
# returns the whole records among them; encode_records() turns output into
# bytes.  Nothing here touches a socket, so every rule of the protocol's
# framing is tested without one.

_HEADER = struct.Struct('!BBHHBx')        # version, type, id, length, padding
_BEGIN_REQUEST_BODY = struct.Struct('!HB5x')     # role, flags
_END_REQUEST_BODY = struct.Struct('!IB3x')       # appStatus, protocolStatus
_UNKNOWN_TYPE_BODY = struct.Struct('!B7x')       # type
_UINT32 = struct.Struct('!I')


class Record(NamedTuple):
    type: int
    request_id: int
    content: bytes


#: record types whose contents make a byte stream (section 3.3): where the
#: records are cut carries no meaning, only the empty record that ends it
STREAM_TYPES = frozenset((FCGI_PARAMS, FCGI_STDIN, FCGI_STDOUT, FCGI_STDERR,
                          FCGI_DATA))


class RecordParser:
    """Incremental FastCGI record parser: ``feed(data)`` takes bytes in any
    chunking and returns the records they complete; ``feed(b'')`` is the end
    of input.  Padding is discarded whatever it holds (3.3).  With
    ``split_streams``, a stream record's content (STREAM_TYPES) comes as it
    arrives, in pieces never empty (only an empty record ends a stream): a
    64 KB STDIN record costs no buffering and no joining."""

    __slots__ = ('split_streams', '_head', '_pieces', '_type', '_request_id',
                 '_content_left', '_padding_left', '_eof')

    def __init__(self, split_streams: bool = False) -> None:
        self.split_streams = split_streams
        self._head = b''            # a record header cut short
        self._pieces = None         # content so far of a record cut short
        self._type = 0              # type and id of the record cut short,
        self._request_id = 0        # whose header is complete
        self._content_left = 0
        self._padding_left = 0
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes held for a record not yet returned whole or in pieces."""
        return len(self._head) + sum(map(len, self._pieces or ()))

    @property
    def in_record(self) -> bool:
        """Has a record begun and not ended, pieces returned or not?"""
        return bool(self._head or self._content_left or self._padding_left
                    or self._pieces is not None)

    def feed(self, data) -> List[Tuple[int, int, bytes]]:
        """The records ``data`` completes, as (type, request_id, content)
        tuples (Record's names cost 4% of the server's CPU, measured).  A
        list, never a generator: ``data`` is a buffer all connections share,
        so all is copied out before this returns (a test pins this)."""
        if not data:
            if self.in_record:
                raise ProtocolError('connection closed in the middle of a '
                                    'record (%d bytes of it received)'
                                    % self.buffered)
            self._eof = True
            return []
        if self._eof:
            raise ProtocolError('data fed after end of input')
        records = []
        append = records.append
        end = len(data)
        pos = self._resume(data, 0, end, append) if self.in_record else 0
        # The common case: whole records, each sliced out once.
        unpack_from = _HEADER.unpack_from
        while end - pos >= FCGI_HEADER_LEN:
            version, rtype, request_id, length, padding = unpack_from(data, pos)
            if version != FCGI_VERSION_1:
                self._bad_version(version, data[pos:pos + FCGI_HEADER_LEN])
            content_end = pos + FCGI_HEADER_LEN + length
            if content_end + padding > end:
                break
            append((rtype, request_id,
                    bytes(data[pos + FCGI_HEADER_LEN:content_end])))
            pos = content_end + padding
        if pos < end:
            self._resume(data, pos, end, append)
        return records

    def _resume(self, data, pos: int, end: int, append) -> int:
        """Go on with the record cut short (or begin one) using data[pos:end];
        return where it ends, or ``end`` when it needs more."""
        if self._pieces is None and not (self._content_left
                                         or self._padding_left):
            # Its header is still incomplete.
            take = min(FCGI_HEADER_LEN - len(self._head), end - pos)
            head = self._head = self._head + bytes(data[pos:pos + take])
            pos += take
            if len(head) < FCGI_HEADER_LEN:
                return pos
            version, rtype, request_id, length, padding = _HEADER.unpack(head)
            if version != FCGI_VERSION_1:
                self._bad_version(version, head)
            self._head = b''
            self._type, self._request_id = rtype, request_id
            self._content_left, self._padding_left = length, padding
            if not length:
                append((rtype, request_id, b''))
            elif not (self.split_streams and rtype in STREAM_TYPES):
                self._pieces = []
        if self._content_left:
            take = min(self._content_left, end - pos)
            if take:
                piece = bytes(data[pos:pos + take])
                pos += take
                self._content_left -= take
                if self._pieces is None:
                    append((self._type, self._request_id, piece))
                else:
                    self._pieces.append(piece)
            if self._content_left:
                return pos
            if self._pieces is not None:
                append((self._type, self._request_id, b''.join(self._pieces)))
                self._pieces = None
        take = min(self._padding_left, end - pos)
        self._padding_left -= take
        return pos + take

    @staticmethod
    def _bad_version(version: int, header) -> None:
        raise ProtocolError('unsupported FastCGI version %d in record header '
                            '%r' % (version, bytes(header)))


def encode_record_parts(record_type: int, request_id: int,
                        content, parts: list) -> list:
    """Append to ``parts`` the records carrying ``content``: headers and
    views of it, no copy.  The one place that cuts output into records of
    at most 65,535 bytes; no padding (optional: web servers read none)."""
    length = len(content)
    if length <= FCGI_MAX_CONTENT_LEN:
        parts.append(_HEADER.pack(FCGI_VERSION_1, record_type, request_id,
                                  length, 0))
        if length:
            parts.append(content)
        return parts
    view = memoryview(content)
    for offset in range(0, length, FCGI_MAX_CONTENT_LEN):
        chunk = view[offset:offset + FCGI_MAX_CONTENT_LEN]
        parts.append(_HEADER.pack(FCGI_VERSION_1, record_type, request_id,
                                  len(chunk), 0))
        parts.append(chunk)
    return parts


def encode_records(record_type: int, request_id: int, content=b'') -> bytes:
    """``content`` as records of one type, in one bytes object."""
    if len(content) <= FCGI_MAX_CONTENT_LEN:
        return _HEADER.pack(FCGI_VERSION_1, record_type, request_id,
                            len(content), 0) + content
    return b''.join(encode_record_parts(record_type, request_id, content, []))


def _encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    if length > 0x7FFFFFFF:
        raise ValueError('name or value longer than 2**31 - 1 bytes')
    return _UINT32.pack(length | 0x80000000)


def encode_pairs(pairs) -> bytes:
    """Encode name-value pairs (section 3.4); ``pairs`` is a mapping or an
    iterable of 2-tuples of bytes (str is encoded as latin-1)."""
    parts = []
    for pair in (pairs.items() if hasattr(pairs, 'items') else pairs):
        name, value = (text.encode('latin-1') if isinstance(text, str)
                       else text for text in pair)
        parts += (_encode_length(len(name)), _encode_length(len(value)),
                  name, value)
    return b''.join(parts)


def _decode_pairs(data: bytes, source, as_dict: bool):
    """The pairs of a name-value stream (3.4), sliced from ``source``:
    ``data`` itself, or ``data`` decoded as latin-1, which keeps every
    offset; a dict (an environ: the hot path, 0.9 us less for nginx's
    params than a call per pair), or a list of 2-tuples."""
    pairs = {} if as_dict else []
    pos = 0
    end = len(data)
    try:
        while pos < end:
            name_length = data[pos]
            value_length = data[pos + 1]
            if name_length | value_length < 0x80:   # both one byte: usual
                pos += 2
            else:
                if name_length & 0x80:
                    name_length = _UINT32.unpack_from(data, pos)[0] \
                        & 0x7FFFFFFF
                    pos += 4
                else:
                    pos += 1
                value_length = data[pos]
                if value_length & 0x80:
                    value_length = _UINT32.unpack_from(data, pos)[0] \
                        & 0x7FFFFFFF
                    pos += 4
                else:
                    pos += 1
            value_start = pos + name_length
            pos = value_start + value_length
            if pos > end:
                raise ProtocolError(
                    'name-value pair of %d + %d bytes runs %d bytes past its '
                    'stream\'s end' % (name_length, value_length, pos - end))
            name = source[value_start - name_length:value_start]
            if as_dict:
                pairs[name] = source[value_start:pos]
            else:
                pairs.append((name, source[value_start:pos]))
    except (IndexError, struct.error):
        raise ProtocolError('name-value pair stream ends inside a length')
    return pairs


def decode_pairs(data: bytes) -> List[Tuple[bytes, bytes]]:
    """Decode a complete name-value pair stream into (name, value) bytes."""
    return _decode_pairs(data, data, False)


def decode_environ(data: bytes) -> Dict[str, str]:
    """FCGI_PARAMS stream -> CGI environ of native strings (PEP 3333: bytes
    decoded as latin-1, which maps every byte and loses none), decoded once."""
    return _decode_pairs(data, data.decode('latin-1'), True)


def encode_begin_request(request_id: int, role: int = FCGI_RESPONDER,
                         keep_conn: bool = False) -> bytes:
    """A BEGIN_REQUEST record, as a web server sends it."""
    return encode_records(FCGI_BEGIN_REQUEST, request_id,
                          _BEGIN_REQUEST_BODY.pack(
                              role, FCGI_KEEP_CONN if keep_conn else 0))


def encode_end_request(request_id: int, app_status: int = 0,
                       protocol_status: int = FCGI_REQUEST_COMPLETE) -> bytes:
    return encode_records(FCGI_END_REQUEST, request_id,
                          _END_REQUEST_BODY.pack(app_status & 0xFFFFFFFF,
                                                 protocol_status))


class _ByRequestId(dict):
    """Bytes made once per request id (web servers reuse a few small ids):
    the empty STDOUT record, a normal END_REQUEST."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, request_id: int) -> bytes:
        value = self[request_id] = self.make(request_id)
        return value


STDOUT_END = _ByRequestId(lambda request_id: encode_records(FCGI_STDOUT,
                                                            request_id))
END_REQUEST_OK = _ByRequestId(encode_end_request)


def encode_get_values_result(query: bytes, known: Dict[str, str]) -> bytes:
    """The GET_VALUES_RESULT answering ``query``: the names asked for that
    are in ``known``, with their values; others are left out (4.1)."""
    answer = []
    for name, _ in decode_pairs(query):
        value = known.get(name.decode('latin-1'))
        if value is not None:
            answer.append((name, value.encode('ascii')))
    return encode_records(FCGI_GET_VALUES_RESULT, FCGI_NULL_REQUEST_ID,
                          encode_pairs(answer))


def decode_begin_request(content: bytes) -> Tuple[int, bool]:
    """BEGIN_REQUEST body -> (role, keep_conn)."""
    if len(content) != _BEGIN_REQUEST_BODY.size:
        raise ProtocolError('BEGIN_REQUEST body is %d bytes, not 8'
                            % len(content))
    role, flags = _BEGIN_REQUEST_BODY.unpack(content)
    return role, bool(flags & FCGI_KEEP_CONN)


def decode_end_request(content: bytes) -> Tuple[int, int]:
    """END_REQUEST body -> (app_status, protocol_status)."""
    if len(content) != _END_REQUEST_BODY.size:
        raise ProtocolError('END_REQUEST body is %d bytes, not 8'
                            % len(content))
    return _END_REQUEST_BODY.unpack(content)


# 5. Request streams ----------------------------------------------------------
#
# The connection's greenlet feeds input streams as records arrive; the
# request's greenlet reads them, waiting when it gets ahead.  Past
# ``spool_size`` unread bytes they spool to a temporary file (as waitress
# does), so the connection never stops reading: other requests on it and
# FCGI_ABORT_REQUEST get through while an application ignores a body.
# Output streams gather small writes (a small response leaves in one send
# with its END_REQUEST) and send at ``flush_size``; a web server that stops
# reading stalls that request's greenlet (back-pressure), not memory.

DEFAULT_SPOOL_SIZE = 1024 * 1024
_PIECE_COST = 64    # bytes a held piece costs beyond its content
_UNSPOOL_SIZE = 64 * 1024   # spooled input back to memory once this is left
_NEVER = float('inf')
DEFAULT_FLUSH_SIZE = 64 * 1024
#: output at least this large is sent without joining it into one buffer
GATHER_SIZE = 128 * 1024


class InputStream:
    """A request's FCGI_STDIN or FCGI_DATA stream, as a read-only binary file
    (a read returns less than asked only at the end of the stream).  Input
    is held in the pieces it arrived in, let go as soon as read; past
    ``spool_size`` unread bytes, they and the rest go to a temporary file
    (not SpooledTemporaryFile: its BytesIO copies every byte once more,
    which profiled as half of the CPU an upload cost)."""

    __slots__ = ('spool_size', 'eof', 'received', '_pieces', '_offset',
                 '_file', '_file_start', '_pos', '_error', '_waiter',
                 '_wanted', '_small')

    def __init__(self, spool_size: int = DEFAULT_SPOOL_SIZE) -> None:
        self.spool_size = spool_size
        self.eof = False            # the empty record that ends it arrived
        self.received = 0           # bytes that arrived so far
        self._pieces = collections.deque()  # in memory, not yet read
        self._offset = 0            # bytes of _pieces[0] already read
        self._file = None           # the temporary file, once spooled
        self._file_start = 0        # stream position of its first byte
        self._pos = 0               # bytes the reader consumed
        self._error = None          # raised to the reader (disk full, ...)
        self._waiter = None         # Event, made when a reader first waits
        self._wanted = 0            # what `received` must reach to wake it
        self._small = 0             # pieces under _PIECE_COST held, about

    @property
    def spooled_bytes(self) -> int:
        """Bytes in the temporary file (it goes once nearly all is read)."""
        return self.received - self._file_start if self._file else 0

    # -- the connection's side --------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._file is None:
            if not self._pieces:
                self._small = 0         # the reader took all there was
            self._pieces.append(data)
            self.received += len(data)
            # A held piece costs an object besides its bytes: counted for
            # small ones past the few that reads cutting records leave, so
            # that tiny records go to disk as soon as large ones would.
            if len(data) < _PIECE_COST:
                self._small += 1
            if (self.received - self._pos + (
                    _PIECE_COST * self._small if self._small > 256 else 0)
                    > self.spool_size):
                self._spool(self._unread_pieces())
        else:
            self._spool((data,))
            self.received += len(data)
        if self._waiter is not None and self.received >= self._wanted:
            self._waiter.set()

    def _unread_pieces(self) -> list:
        pieces = list(self._pieces)
        if self._offset:
            pieces[0] = memoryview(pieces[0])[self._offset:]
        self._pieces.clear()
        self._offset = 0
        self._small = 0
        return pieces

    def _spool(self, pieces) -> None:
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile()
                self._file_start = self._pos
            else:
                self._file.seek(0, os.SEEK_END)
            self._file.writelines(pieces)
        except OSError as exc:
            # Disk full while spooling: this request fails, nothing else.
            self.fail(OSError(exc.errno, 'cannot spool request body: %s'
                              % (exc.strerror or exc)))

    def feed_eof(self) -> None:
        self.eof = True
        if self._waiter is not None:
            self._waiter.set()

    def fail(self, error: BaseException) -> None:
        """The reader's next read raises ``error``; later input is dropped."""
        self._error = error
        self._pieces.clear()
        if self._waiter is not None:
            self._waiter.set()

    def close(self) -> None:
        self._pieces.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.eof or self.received > self._pos:     # a reader is owed
            self.fail(ConnectionClosed('request has ended'))

    # -- the reader's side --------------------------------------------------

    def _wait(self, wanted: int) -> None:
        """Wait until ``wanted`` bytes arrived in all, or the stream ended
        or failed: a reader is not woken for every piece."""
        if self._error is not None:
            raise self._error
        self._wanted = wanted
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = gevent.event.Event()
        waiter.clear()
        waiter.wait()
        if self._error is not None:
            raise self._error

    def _available(self, size: int) -> int:
        """Wait until ``size`` bytes (all, when negative) can be read, or
        the end; return how many can be read now."""
        if size is None or size < 0:
            while not self.eof:
                self._wait(_NEVER)
            available = self.received - self._pos
        else:
            while self.received - self._pos < size and not self.eof:
                self._wait(self._pos + size)
            available = min(size, self.received - self._pos)
        if self._error is not None:
            raise self._error
        return available

    def _take(self, size: int) -> bytes:
        """Consume ``size`` bytes, all of which have arrived."""
        self._pos += size
        if self._file is not None:
            self._file.seek(self._pos - size - self._file_start)
            data = self._file.read(size)
            left = self.received - self._pos
            if left <= _UNSPOOL_SIZE:
                # Nearly all read: the rest comes back to memory and the
                # file goes, so that the disk holds only a backlog.
                rest = self._file.read(left) if left else b''
                self._file.close()
                self._file = None
                if rest:
                    self._pieces.append(rest)
            return data
        pieces = self._pieces
        piece = pieces[0]
        start = self._offset
        left = len(piece) - start
        if size < left:
            self._offset = start + size
            return piece[start:start + size]
        pieces.popleft()
        self._offset = 0
        if size == left:
            return piece[start:] if start else piece
        taken = [piece[start:] if start else piece]
        size -= left
        while size:
            piece = pieces[0]
            if len(piece) <= size:
                taken.append(pieces.popleft())
                size -= len(piece)
            else:
                taken.append(piece[:size])
                self._offset = size
                size = 0
        return b''.join(taken)

    def _line_length(self, limit: int, start: int = 0) -> int:
        """Length of the unread input's first line, newline included, seen
        from ``start`` (no newline before it) to ``limit``; -1: none."""
        if self._file is not None:
            self._file.seek(self._pos - self._file_start + start)
            line = self._file.readline(limit - start)
            return start + len(line) if line.endswith(b'\n') else -1
        return _line_length(self._pieces, self._offset, limit, start)

    def read(self, size: int = -1) -> bytes:
        available = self._available(size)
        return self._take(available) if available > 0 else b''

    def readline(self, size: int = -1) -> bytes:
        size = -1 if size is None else size
        scanned = 0     # unread bytes known to hold no newline: not again
        while True:
            if self._error is not None:
                raise self._error
            available = self.received - self._pos
            limit = available if size < 0 else min(size, available)
            length = (self._line_length(limit, scanned) if limit > scanned
                      else -1)
            if length < 0 and (self.eof or (size >= 0 and limit >= size)):
                length = limit
            if length >= 0:
                return self._take(length) if length else b''
            scanned = limit
            self._wait(self.received + 1)

    def readlines(self, hint: int = -1) -> List[bytes]:
        return list(self)       # the hint may be ignored (PEP 3333)

    def __iter__(self):
        return iter(self.readline, b'')

    def readable(self) -> bool:
        return True

    def __repr__(self) -> str:
        return '<InputStream %d bytes received, %d read%s%s>' % (
            self.received, self._pos, ', spooled' if self._file else '',
            ', ended' if self.eof else '')


def _line_length(pieces, offset: int, limit: int, start: int) -> int:
    """InputStream._line_length in held pieces, the first of which was
    read up to ``offset``."""
    seen = 0                    # unread bytes before this piece
    for piece in pieces:
        size = len(piece) - offset
        if seen + size > start:
            found = piece.find(b'\n', offset + max(0, start - seen),
                               min(len(piece), offset + limit - seen))
            if found >= 0:
                return seen + found - offset + 1
        seen += size
        if seen >= limit:
            break
        offset = 0              # the next pieces are unread from their start
    return -1


_NO_INPUT = InputStream()
_NO_INPUT.feed_eof()


def response_status(stdout: bytes) -> int:
    """The HTTP status of a CGI response: its Status header, else 302 with a
    Location header, else 200."""
    head = re.split(br'\r?\n\r?\n', stdout, maxsplit=1)[0]
    location = False
    for line in re.split(br'\r?\n', head):
        name, _, value = line.partition(b':')
        name = name.strip().lower()
        if name == b'status':
            return int(value.split()[0])
        location = location or name == b'location'
    return 302 if location else 200


class OutputStream:
    """A request's FCGI_STDOUT or FCGI_STDERR stream, as a write-only file
    of bytes (FCGI_STDERR also takes str, as UTF-8).  Writes are gathered
    until ``flush_size`` bytes, a ``flush()``, or the end of the request.
    FCGI_STDOUT knows where its CGI head ends (``head_size``: for the size
    of the body and the status), told by our WSGI drivers, else read."""

    __slots__ = ('_request', 'record_type', 'flush_size', '_chunks',
                 '_pending', 'bytes_written', '_flush_soon', 'head_size',
                 '_head')

    def __init__(self, request: 'Request', record_type: int,
                 flush_size: int = DEFAULT_FLUSH_SIZE) -> None:
        self._request = request
        self.record_type = record_type
        self.flush_size = flush_size
        self._chunks, self._pending = [], 0
        self.bytes_written = 0      # accepted by write() so far
        self._flush_soon = False    # flush_soon()'s callback is due
        self.head_size = None if record_type == FCGI_STDOUT else 0
        self._head = b''            # what was written of a head not yet read

    def write(self, data) -> int:
        if type(data) is not bytes:
            if isinstance(data, str):
                if self.record_type != FCGI_STDERR:
                    raise TypeError('stdout takes bytes, not str: encode '
                                    'the response body first')
                data = data.encode('utf-8', 'backslashreplace')
            else:
                data = bytes(data)
        if self._request.ended:
            raise ConnectionClosed('request %d has already ended'
                                   % self._request.id)
        length = len(data)
        if length:
            if self.head_size is None:
                self._read_head(data)
            self._chunks.append(data)
            self._pending += length
            self.bytes_written += length
            if self._pending >= self.flush_size:
                self.flush()
        return length

    def _read_head(self, data: bytes) -> None:
        """Find where the head ends (its blank line) and its status; a head
        still unfinished after 64 KB is taken as none."""
        head = self._head = self._head + data
        ends = [found + len(blank) for blank in (b'\r\n\r\n', b'\n\n')
                for found in [head.find(blank)] if found >= 0]
        if ends:
            self.head_size = min(ends)
            with suppress(ValueError, IndexError):
                self._request.response_status = response_status(head)
        elif len(head) > 65536:
            self.head_size = 0
        if self.head_size is not None:
            self._head = b''

    def writelines(self, lines: Iterable[bytes]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        chunks = self._chunks
        if not chunks:
            return
        if self._pending < GATHER_SIZE:
            self._request.send(self.take_records())
            return
        # Large output: records made of views of what was written, handed
        # to the kernel in one gather write; joining would copy it twice.
        parts = []
        for chunk in chunks:
            encode_record_parts(self.record_type, self._request.id, chunk,
                                parts)
        self._chunks, self._pending = [], 0
        self._request.send(parts)

    def flush_soon(self) -> None:
        """Send what was written as soon as this greenlet waits for anything
        (the event loop then runs), or with the end of the request if that
        comes first: a response's last bytes, the end of its stream and
        END_REQUEST then leave in one write, and no block waits longer than
        its application takes to wait (PEP 3333's "must not delay")."""
        if self._chunks and not self._flush_soon:
            self._flush_soon = True
            gevent.get_hub().loop.run_callback(self._flush_from_loop)

    def _flush_from_loop(self) -> None:
        # In the hub, which must never wait: a greenlet of its own sends
        # (and waits, if the web server reads slowly).
        self._flush_soon = False
        if self._chunks and not self._request.ended:
            greenlet.greenlet(self._send_held, gevent.get_hub()).switch()

    def _send_held(self) -> None:
        with suppress(ConnectionClosed):
            # taken when our turn to send comes: whoever sends a stream's
            # bytes, they leave in the order they were written
            self._request.send(self.take_records)

    def take_records(self) -> bytes:
        """What was written and not yet sent, as records; the buffer empties."""
        chunks = self._chunks
        if not chunks:
            return b''
        data = chunks[0] if len(chunks) == 1 else b''.join(chunks)
        self._chunks, self._pending = [], 0
        return encode_records(self.record_type, self._request.id, data)

    def discard_unsent(self) -> bool:
        """Drop what was written if none of it was sent (an error page takes
        its place); False when too late."""
        if self.bytes_written != self._pending:
            return False
        self._chunks, self._pending, self.bytes_written = [], 0, 0
        if self.record_type == FCGI_STDOUT:
            self.head_size, self._head = None, b''
        return True

    def writable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._request.ended

    def close(self) -> None:
        """Streams end with their request; this only flushes."""
        if not self._request.ended:
            self.flush()


# 6. Requests -----------------------------------------------------------------
#
# A Request is what a request handler receives (environ, stdin, stdout...)
# and where the policy for one request lives: the limits (431, 413), running
# the handler in a greenlet of its own under request_timeout, our own error
# pages.  The connection feeds it records; it tells the server when it
# begins, is refused and ends, and names nothing that watches.

def plain_response(status: str, body: bytes,
                   kind: bytes = b'text/plain; charset=utf-8',
                   headers: bytes = b'') -> bytes:
    """A CGI response of our own (an error page, ping, the status page)."""
    return b'Status: %s\r\nContent-Type: %s\r\n%sContent-Length: %d\r\n' \
        b'\r\n%s' % (status.encode('ascii'), kind, headers, len(body), body)


ERROR_STATUS = '500 Internal Server Error'
ERROR_BODY = b'Internal Server Error\n'
TIMEOUT_STATUS = '504 Gateway Timeout'
TIMEOUT_BODY = b'Gateway Timeout: the application took too long\n'
TOO_LARGE_HEADERS = '431 Request Header Fields Too Large'
TOO_LARGE_BODY = '413 Content Too Large'

# How a request's handler ended (Request.outcome): its response whole; a
# failure answered by our error page; cancelled by request_timeout; aborted
# by the web server (or its connection lost); a response cut short.
OK, FAILED, TIMED_OUT, ABORTED, CUT = ('ok', 'failed', 'timed out',
                                       'aborted', 'cut short')


def request_path(environ: Dict[str, str]) -> str:
    """The whole path: SCRIPT_NAME + PATH_INFO as sent or, when both are
    empty, REQUEST_URI's path, %-decoded."""
    path = environ.get('SCRIPT_NAME', '') + environ.get('PATH_INFO', '')
    if not path:
        from urllib.parse import unquote_to_bytes
        uri = environ.get('REQUEST_URI') or environ.get('DOCUMENT_URI', '')
        path = unquote_to_bytes(uri.partition('?')[0]).decode('latin-1')
    return path


def mount(environ: Dict[str, str], script_name: str) -> None:
    """SCRIPT_NAME := where the application is mounted, PATH_INFO := the
    rest of request_path(), whatever the web server sent (Debian's nginx
    and Apache send the whole path as SCRIPT_NAME, HAProxy none)."""
    path = request_path(environ)
    if path == script_name or path.startswith(script_name + '/'):
        environ['SCRIPT_NAME'] = script_name
        environ['PATH_INFO'] = path[len(script_name):]
    else:
        logger.debug('path %r is outside script_name %r', path, script_name)
        environ['SCRIPT_NAME'] = ''
        environ['PATH_INFO'] = path


_getrefcount = sys.getrefcount
_getweakrefcount = weakref.getweakrefcount


class RequestGreenlets:
    """Run requests in greenlets that then wait for the next request (at
    most ``spare`` wait parked): a new greenlet's first switch costs about
    9.5 us, a third of a small request's work, and (CPython 3.11) an mmap of
    a frame stack, 17 us more for a Flask request; a parked one's, 1 us.
    Nothing a request leaves behind reaches a later one: each runs in a
    fresh contextvars.Context; a cancellation reaches only the request it
    was meant for; a parked greenlet is reused only if nothing but its own
    frame refers to it, as a probe greenlet that ran nothing shows (one
    held by a stray timer, a registry or gevent.local data is left parked,
    and a timer that fires ends it, quietly)."""

    _of_hub = weakref.WeakKeyDictionary()

    @classmethod
    def of_this_hub(cls) -> 'RequestGreenlets':
        """The thread's (a fork, too, has a hub of its own)."""
        hub = gevent.get_hub()
        runner = cls._of_hub.get(hub)
        if runner is None:
            runner = cls._of_hub[hub] = cls()
        return runner

    def __init__(self, spare: int = 100) -> None:
        self.hub = gevent.get_hub()
        self.spare = spare
        self.parked: List = []
        self.clean_refs = None  # references to a parked greenlet, no more
        self._probe = greenlet.greenlet(self._serve, parent=self.hub)
        self._probe.request = None
        self.hub.loop.run_callback(self._probe.switch, lambda request: None,
                                   None)       # (runs nothing)

    def start(self, function, request) -> 'greenlet.greenlet':
        """Run function(request) soon, in a parked greenlet or a new one."""
        if self.clean_refs is None and self._probe in self.parked:
            self._measure_probe()
        worker = None
        if self.parked:
            worker = self.parked.pop()
            # (the parked list's reference is gone: its frame's, the local
            # variable's and getrefcount's own remain)
            if (_getrefcount(worker) != self.clean_refs
                    or _getweakrefcount(worker)):
                worker = None       # something still holds it: not reused
        if worker is None:
            worker = greenlet.greenlet(self._serve, parent=self.hub)
        worker.request = request
        self.hub.loop.run_callback(worker.switch, function, request)
        return worker

    def _measure_probe(self) -> None:
        probe = self._probe
        self._probe = None
        self.parked.remove(probe)
        self.clean_refs = _getrefcount(probe)
        self.parked.insert(0, probe)        # the last to be reused

    def cancel(self, worker, request) -> None:
        """Raise RequestAborted in the greenlet running ``request``."""
        self.hub.loop.run_callback(self._cancel, worker, request)

    @staticmethod
    def _cancel(worker, request) -> None:
        if getattr(worker, 'request', None) is request and not worker.dead:
            worker.throw(RequestAborted)

    def _serve(self, function, request) -> None:   # a greenlet's body
        current = greenlet.getcurrent()
        while True:
            contextvars.Context().run(function, request)
            current.request = None
            function = request = None   # a parked greenlet holds nothing
            if len(self.parked) >= self.spare:
                return
            self.parked.append(current)
            try:
                function, request = self.hub.switch()
            except BaseException:
                # thrown at while parked (a stray timer of some application):
                # this greenlet ends, quietly
                if current in self.parked:
                    self.parked.remove(current)
                return


class LoadShedder:
    """CoDel: a request waits for the CPU from its accept or PARAMS' end to
    its handler's start; while none started within ``target`` for 5 x that,
    the queue stands: one that waited longer is shed (503), as is any that
    waited 5 x ``target``."""

    def __init__(self, target: float) -> None:
        self.target = target
        self.started = self.last_good = self.last_start = time.monotonic()
        self.stalled = 0.0          # when the CPU was last held that long
        self.logged = 0.0

    def admit(self, request, waited: float = 0.0) -> None:
        # it sat in the kernel's queue (since we serve, at most): none started
        request.queued = max(time.monotonic() - waited, self.started)
        self.last_good = min(self.last_good, request.queued)

    def in_time(self, request) -> bool:     # (as its handler would start)
        now = time.monotonic()
        waited = now - request.queued
        interval = 5 * self.target
        if now - self.last_start > interval:    # none started: a slow
            self.stalled = now                  # request held the CPU
        self.last_start = now
        if self.stalled == now or waited <= self.target:
            self.last_good = now
        after_stall = now - self.stalled <= interval
        in_time = waited <= self.target or (now - self.last_good <= interval
                                            and (waited <= interval
                                                 or after_stall))
        if not in_time and now - self.logged >= 1.0:   # once a second at most
            logger.warning('overloaded: requests that waited over %gs for '
                           'the CPU are answered 503 (queue_timeout)',
                           self.target)
            self.logged = now
        return in_time


class Request:
    """One FastCGI request, as a request handler receives it: environ
    (FCGI_PARAMS, str: str), stdin, data (FILTER's FCGI_DATA), stdout (a CGI
    response), stderr (to the web server's log), role, id, keep_conn; for
    its watchers, what came of it: response_status, response_bytes (body),
    outcome (OK, FAILED...), started and duration (seconds)."""

    __slots__ = ('connection', 'server', 'id', 'role', 'keep_conn', 'environ',
                 '_stdin', 'data', 'stdout', '_stderr', 'greenlet', 'ended',
                 'response_status', 'params_done', '_params', 'response_cut',
                 'started', 'outcome', 'duration', 'queued', '__weakref__',
                 '__dict__')     # (what server hooks keep on a request)

    def __init__(self, connection, request_id: int, role: int,
                 keep_conn: bool) -> None:
        server = connection.server
        self.connection = connection
        self.server = server
        self.id = request_id
        self.role = role
        self.keep_conn = keep_conn
        self.environ: Dict[str, str] = {}
        # An authorizer gets no body (6.3), only a filter DATA: the one empty
        # stream all share.  Others are made when first used.
        self._stdin = _NO_INPUT if role == FCGI_AUTHORIZER else None
        self.data = (InputStream(server.settings.spool_size)
                     if role == FCGI_FILTER else _NO_INPUT)
        self.stdout = OutputStream(self, FCGI_STDOUT)
        self._stderr = None
        self.greenlet = None            # runs the handler once PARAMS ended
        self.ended = False              # END_REQUEST sent, or connection lost
        self.response_status = 0        # 200..., once its head is written
        self.response_cut = False       # failed after output was sent
        self.started = 0.0              # time.time() when its handler began
        self.outcome = None             # once its handler has ended
        self.duration = 0.0
        self.params_done = False
        self._params = b''              # PARAMS so far, one buffer
        self.queued = 0.0               # time.monotonic(), if it queued

    @property
    def stdin(self) -> InputStream:
        stream = self._stdin
        if stream is None:
            stream = self._stdin = InputStream(self.server.settings.spool_size)
        return stream

    @property
    def stderr(self) -> OutputStream:
        stream = self._stderr
        if stream is None:
            stream = self._stderr = OutputStream(self, FCGI_STDERR)
        return stream

    @property
    def input_complete(self) -> bool:
        """PARAMS, STDIN and DATA have all ended (asking makes no stream)."""
        stdin = self._stdin
        return (self.params_done and stdin is not None and stdin.eof
                and self.data.eof)

    @property
    def response_bytes(self) -> int:
        """Bytes of response body written (its head not counted)."""
        head_size = self.stdout.head_size
        return 0 if head_size is None else self.stdout.bytes_written - head_size

    @property
    def bytes_received(self) -> int:
        """Bytes of request body received (FCGI_STDIN)."""
        return 0 if self._stdin is None else self._stdin.received

    def __repr__(self) -> str:
        return '<Request %d %s %s %s>' % (
            self.id, ROLE_NAMES.get(self.role, self.role),
            self.environ.get('REQUEST_METHOD', '-'),
            self.environ.get('REQUEST_URI', self.environ.get('PATH_INFO', '-')))

    # -- what the web server sends, within the server's limits --------------

    def add_params(self, content: bytes) -> bool:
        """Take a PARAMS record; True once the stream has ended and the
        request may run (False also when it was refused over a limit)."""
        if self.params_done:
            raise ProtocolError('PARAMS for request %d after its PARAMS '
                                'stream ended' % self.id)
        settings = self.server.settings
        if content:
            params = self._params
            if len(params) + len(content) > settings.max_params_size:
                self.refuse(TOO_LARGE_HEADERS, 'FCGI_PARAMS over %d bytes'
                            % settings.max_params_size)
            elif not params:
                self._params = content
            else:   # one growing buffer: 2-byte records cost their bytes
                if type(params) is bytes:
                    params = self._params = bytearray(params)
                params += content
            return False
        self.params_done = True
        params = self._params
        self._params = None
        environ = self.environ = decode_environ(params)
        if len(environ) > settings.max_params:
            self.refuse(TOO_LARGE_HEADERS, '%d FCGI_PARAMS, more than %d'
                        % (len(environ), settings.max_params))
            return False
        length = environ.get('CONTENT_LENGTH')
        if length and not (length.isascii() and length.isdigit()
                           and len(length) < 19):
            # Not a length ('-1' for a chunked body, or worse): the body is
            # read to its end (wsgi.input_terminated).
            del environ['CONTENT_LENGTH']
            length = None
        max_body = settings.max_body_size
        if (length and max_body is not None and self.role != FCGI_AUTHORIZER
                and int(length) > max_body):
            self.refuse(TOO_LARGE_BODY, 'CONTENT_LENGTH %s over '
                        'max_body_size %d' % (length, max_body))
            return False
        if settings.script_name is not None:
            mount(environ, settings.script_name)
        return True

    def add_input(self, stream: InputStream, content: bytes, name: str) -> None:
        """Take a STDIN or DATA record for ``stream``."""
        if not self.params_done:
            raise ProtocolError('%s for request %d before its PARAMS stream '
                                'ended' % (name, self.id))
        if stream.eof:
            raise ProtocolError('%s for request %d after its %s stream ended'
                                % (name, self.id, name))
        if not content:
            stream.feed_eof()
            return
        settings = self.server.settings
        max_body = settings.max_body_size
        if (max_body is not None and stream is self._stdin
                and stream.received + len(content) > max_body):
            # No CONTENT_LENGTH said so (a chunked upload): stop here.
            self.refuse(TOO_LARGE_BODY, 'body over max_body_size %d'
                        % max_body)
            return
        stream.feed(content)
        spooled = stream.spooled_bytes
        if spooled > settings.max_spool_size:
            self.refuse(TOO_LARGE_BODY, 'more than max_spool_size %d bytes of '
                        'body waiting unread on disk' % settings.max_spool_size)
        elif spooled:
            # The application is behind: let it read before we read on (the
            # connection greenlet would not yield while input keeps coming).
            gevent.sleep(0)

    # -- ending it -------------------------------------------------------------

    def answer_error(self, status: str, body: bytes) -> bool:
        """Our error page in place of the response, if none of it was sent;
        else False, and the response is cut short (see abandon)."""
        if self.ended:
            return False
        if not self.stdout.discard_unsent():
            self.response_cut = True
            return False
        self.stdout.write(plain_response(status, body))
        return True

    def refuse(self, status: str, reason: str) -> None:
        """Answer with an HTTP error of our own; cancel a running handler."""
        logger.warning('%s: request %d refused: %s', self.connection, self.id,
                       reason)
        self.server.request_refused(self, reason)
        output = b''
        if self.answer_error(status, status.encode('ascii')):
            output = self.stdout.take_records()
        self.end(1, output=output + STDOUT_END[self.id])
        self.cancel()

    def shed(self) -> None:
        """503, the application not called (LoadShedder): overloaded."""
        self.server.request_refused(self, 'shed')
        self.stdout.write(plain_response(
            '503 Service Unavailable', b'Overloaded: try again\n',
            headers=b'Retry-After: 1\r\n'))
        self.end(output=self.stdout.take_records() + STDOUT_END[self.id])

    def send(self, data, more: bool = False) -> None:
        """Output of this request to its connection (see Transport.send)."""
        self.connection.transport.send(data, more)

    def end(self, app_status: int = 0,
            protocol_status: int = FCGI_REQUEST_COMPLETE,
            output: bytes = b'') -> None:
        """Send ``output`` and END_REQUEST, then close the connection's
        writing side if this was its last request."""
        if self.ended:
            return
        self.release()
        connection = self.connection
        last = not self.keep_conn or (not connection.requests and (
            self.server.stopping or connection.abandoned))
        end = (END_REQUEST_OK[self.id]
               if app_status == 0 and protocol_status == FCGI_REQUEST_COMPLETE
               else encode_end_request(self.id, app_status, protocol_status))
        connection.transport.send(output + end, more=last)
        connection.last_active = time.monotonic()
        if last:
            connection.close_write()

    def abandon(self) -> None:
        """End a request whose response was cut short (failed after output
        was sent) so that the web server sees it fail: no END_REQUEST, which
        would make nginx take, and cache, a truncated body as whole; the
        connection closes once no other request is on it."""
        connection = self.connection
        self.release()
        logger.warning('%s: the response to %r was cut short: its connection '
                       'closes: the web server sees it fail', connection, self)
        connection.abandoned = True     # new requests are refused
        if not connection.requests:
            connection.transport.abort()
            connection.close()

    def release(self) -> None:
        """The request is over: it leaves its connection, drops its input."""
        self.ended = True
        if self.connection.requests.pop(self.id, None) is not None:
            self.server.request_released(self)
        if self._stdin is not None:
            self._stdin.close()
        if self.data is not _NO_INPUT:
            self.data.close()

    def cancel(self) -> None:
        """RequestAborted in the greenlet running the handler, if any."""
        if self.greenlet is not None:
            RequestGreenlets.of_this_hub().cancel(self.greenlet, self)


def run_request(request: Request) -> None:
    """The request's greenlet: run the handler (or the page at its path),
    end with what it wrote, tell the server how it went."""
    server = request.server
    if request.queued and not server.load.in_time(request):
        request.greenlet = None
        with suppress(ConnectionClosed, RequestAborted):
            request.shed()
        return
    request.started = started = time.time()
    app_status = 0
    outcome = OK
    request_timeout = server.settings.request_timeout
    timeout = RequestTimeout(request_timeout) if request_timeout else None
    try:
        if timeout is not None:
            timeout.start()
        result = server.request_started(request)(request)
        if type(result) is int:
            app_status = result
    except (RequestAborted, ConnectionClosed):
        outcome = ABORTED
    except BaseException as exc:
        app_status = 1
        if exc is timeout:      # with the stack it was waiting in
            outcome = TIMED_OUT
            logger.error('%s: %r cancelled after request_timeout (%gs)',
                         request.connection, request, request_timeout,
                         exc_info=True)
            request.answer_error(TIMEOUT_STATUS, TIMEOUT_BODY)
        else:   # any BaseException: one request's failure, not the server's
            outcome = FAILED
            logger.exception('%s: request handler failed on %r',
                             request.connection, request)
            request.answer_error(ERROR_STATUS, ERROR_BODY)
    finally:
        if timeout is not None:
            timeout.close()
    if app_status and outcome == OK:
        outcome = FAILED        # (our WSGI driver answered the failure)
    try:
        if request.response_cut:
            outcome = CUT
            request.abandon()
        elif not request.ended:
            output = request.stdout.take_records() + STDOUT_END[request.id]
            stderr = request._stderr
            if stderr is not None and stderr.bytes_written:
                output += (stderr.take_records()
                           + encode_records(FCGI_STDERR, request.id))
            request.end(app_status, output=output)
    except (ConnectionClosed, RequestAborted):
        outcome = ABORTED
    request.greenlet = None     # the greenlet serves the next request
    request.outcome = outcome
    request.duration = time.time() - started
    server.request_ended(request)


# 7. Connections --------------------------------------------------------------
#
# One greenlet per connection reads and dispatches records; each request runs
# in a greenlet of its own, so multiplexed requests may finish in any order.
# The connection greenlet never waits for a request: GET_VALUES, ABORT_REQUEST
# and the next BEGIN_REQUEST get through at any time (HAProxy sends the next
# request before the previous one's END_REQUEST).  The web server owns a
# connection (3.5) unless a request came without FCGI_KEEP_CONN; we close one
# ourselves only then, on malformed input, or when the server stops.

_MSG_MORE = getattr(_stdlib_socket, 'MSG_MORE', 0)
_TCP_QUICKACK = getattr(_stdlib_socket, 'TCP_QUICKACK', None)   # Linux
_IOV_MAX = 1024     # buffers one sendmsg() may take (Linux's IOV_MAX)
_ABORT_MARKER = bytes(FCGI_HEADER_LEN)      # version 0: see Transport.abort
_SOCKET_TIMEOUT = _stdlib_socket.timeout    # not TimeoutError before 3.10


def tcp_info(sock, offset: int, count: int = 1) -> Optional[tuple]:
    """``count`` u32 of TCP_INFO from ``offset`` (Linux; else None)."""
    try:
        return struct.unpack_from('%dI' % count, sock.getsockopt(
            _stdlib_socket.IPPROTO_TCP, _stdlib_socket.TCP_INFO, 104), offset)
    except (AttributeError, OSError, struct.error):
        return None


class Transport:
    """One connection's socket: the only code that reads, writes or touches
    gevent's private parts of it.  Requests take turns to send, whole; a
    failed send calls ``on_lost(error)`` once and raises ConnectionClosed."""

    __slots__ = ('socket', 'tcp', 'closed', 'on_lost', '_send_lock',
                 '_wait', '_readable', '_drained')

    #: bytes asked of each recv(), into one buffer the process shares (no
    #: greenlet switch comes between a recv_into() and feed()'s copy), so it
    #: can be large: a fifth less CPU per 1 MB upload than 64 KB (measured).
    recv_size = 256 * 1024
    _recv_buffer = None

    def __init__(self, sock, tcp: bool, on_lost) -> None:
        self.socket = sock
        self.tcp = tcp
        self.closed = False
        self.on_lost = on_lost
        if tcp:
            # Nagle's algorithm would hold a write while an earlier one is
            # unacknowledged, and the web server delays its ACK (40 ms on
            # Linux): we write whole records, and gather a response's end
            # into one write ourselves (OutputStream.flush_soon), so the
            # kernel has nothing to wait for.  As gunicorn (on the
            # listener) and waitress do; nginx sets it on kept-open
            # connections; uWSGI leaves it off (--tcp-nodelay) and stalls.
            # Set per connection: an inherited listener may not have it.
            with suppress(OSError):
                sock.setsockopt(_stdlib_socket.IPPROTO_TCP,
                                _stdlib_socket.TCP_NODELAY, 1)
        self._send_lock = gevent.lock.Semaphore()
        # After a read that emptied the socket the next would fail (EAGAIN,
        # an exception) before gevent waits: so wait first, and read first
        # only after a read that filled the buffer.  Without gevent's
        # private wait and watcher, plain reads.
        self._wait = getattr(sock, '_wait', None)
        self._readable = getattr(sock, '_read_event', None)
        self._drained = self._wait is not None and self._readable is not None

    def receive(self) -> memoryview:
        """What arrived (empty at the end), waiting if need be: a view of the
        shared buffer, valid until any connection's next receive()."""
        buffer = Transport._recv_buffer
        if buffer is None or len(buffer) != self.recv_size:
            buffer = Transport._recv_buffer = memoryview(
                bytearray(self.recv_size))
        if self._drained:
            self._wait(self._readable)
        received = self.socket.recv_into(buffer)
        self._drained = self._readable is not None and received < len(buffer)
        return buffer[:received]

    def quick_ack(self) -> None:
        """ACK at once what the next read takes (TCP_QUICKACK) while input
        streams in: a body's small last segment waits (Nagle) for our ACK,
        which a request-response connection delays by up to 40 ms."""
        if self.tcp and self._drained and _TCP_QUICKACK is not None:
            self.socket.setsockopt(_stdlib_socket.IPPROTO_TCP, _TCP_QUICKACK,
                                   1)

    def settimeout(self, timeout: Optional[float]) -> None:
        self.socket.settimeout(timeout)

    def waited(self) -> float:
        """Seconds since data came (TCP_INFO): a new connection's wait."""
        info = tcp_info(self.socket, 52) if self.tcp else None
        return info[0] / 1000 if info else 0.0

    def send(self, data, more: bool = False) -> None:
        """Send bytes, or a list of buffers (gather writes: the kernel copies
        them, we do not), whole; or what the function ``data`` returns when
        our turn to send comes.  ``more``: our FIN follows, and MSG_MORE
        lets it ride on the last segment: the web server learns that the
        connection closes with the END_REQUEST, not after pooling it."""
        flags = _MSG_MORE if more and self.tcp else 0
        with self._send_lock:
            if self.closed:
                raise ConnectionClosed('connection to the web server is '
                                       'closed')
            if callable(data):
                data = data()
                if not data:
                    return
            sent = 0
            try:
                if type(data) is not list:
                    # One send() usually takes it all; gevent's sendall()
                    # would first ask for SO_SNDBUF, a syscall per call.
                    sent = self.socket.send(data, flags)
                    if sent < len(data):
                        view = memoryview(data)
                        while sent < len(data):
                            sent += self.socket.send(view[sent:], flags)
                    return
                views = [memoryview(part).cast('B') for part in data]
                while views:
                    done = self.socket.sendmsg(views[:_IOV_MAX], (), flags)
                    sent += done
                    while done:
                        size = views[0].nbytes
                        if done >= size:
                            done -= size
                            del views[0]
                        else:
                            views[0] = views[0][done:]
                            done = 0
            except OSError as exc:
                raise self._lost(exc) from None
            except BaseException:
                if sent:
                    self._cut()
                raise

    def _lost(self, exc: OSError) -> ConnectionClosed:
        if not self.closed:
            self.on_lost(exc)
        return ConnectionClosed(str(exc))

    def _cut(self) -> None:
        """A send was interrupted partway (a timeout, a cancellation): what
        we sent next would land inside the cut record: close instead."""
        if not self.closed:
            self.on_lost(ConnectionClosed('a send was interrupted partway '
                                          'through a record'))

    def abort(self) -> None:
        """Make the web server fail the response it is receiving.  FastCGI
        has no record for that, and a close alone lets nginx (buffering off)
        end a chunked response as if whole: a record header of version 0,
        which every web server refuses, fails it (sent only if at once)."""
        try:
            self.socket.settimeout(0.0)
            self.socket.send(_ABORT_MARKER)
        except OSError:
            pass

    def shutdown_write(self) -> bool:
        """Send our FIN; False when the connection is already gone."""
        try:
            self.socket.shutdown(_stdlib_socket.SHUT_WR)
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.closed = True
        self.socket.close()


class Connection:
    """One connection from the web server: reads records, dispatches them to
    the ``on_*(request_id, content)`` methods ``record_handler_names`` names
    (a subclass may override any), and owns the connection's lifetime."""

    #: seconds to wait for the web server to close after we shut down our side
    linger_timeout = 5.0

    #: the dispatch table, management records (request id 0) included;
    #: a type not in it is answered by on_unknown_type
    record_handler_names = {
        FCGI_BEGIN_REQUEST: 'on_begin_request', FCGI_PARAMS: 'on_params',
        FCGI_ABORT_REQUEST: 'on_abort_request', FCGI_STDIN: 'on_stdin',
        FCGI_GET_VALUES: 'on_get_values', FCGI_DATA: 'on_data'}

    def __init__(self, server, sock, address) -> None:
        self.server = server
        self.peer = address
        self.transport = Transport(sock, bool(address), self.lost)
        self.requests: Dict[int, Request] = {}
        self.closed = False
        self.closing = False            # our side is shut, waiting for theirs
        self.abandoned = False          # closes when its requests have ended
        self._linger_timer = self._drain_timer = None
        self.last_active = time.monotonic()     # when a request last ended
        self.got_request = False                # a request's PARAMS came
        self.record_handlers = {
            record_type: getattr(self, name)
            for record_type, name in self.record_handler_names.items()}

    def __repr__(self) -> str:
        return '<Connection from %s>' % (self.peer or 'unix socket',)

    # -- reading ------------------------------------------------------------

    def owes_input(self, parser: RecordParser) -> bool:
        """Is the web server in the middle of sending a record, a request's
        input or, on a new connection, its first request?"""
        if parser.in_record or not self.got_request:
            return True
        for request in self.requests.values():
            if not request.input_complete:
                return True
        return False

    def run(self) -> None:
        parser = RecordParser(split_streams=True)
        feed = parser.feed
        transport = self.transport
        receive = transport.receive
        handlers = self.record_handlers
        read_timeout = self.server.settings.read_timeout
        timeout = None
        quick_ack = transport.tcp and _TCP_QUICKACK is not None
        try:
            while not self.closed:
                owing = (read_timeout or quick_ack) and self.owes_input(parser)
                if read_timeout:
                    # An idle kept-open connection may wait as long as the
                    # web server likes; one that owes us input may not.
                    wanted = read_timeout if owing else None
                    if wanted != timeout:
                        transport.settimeout(wanted)
                        timeout = wanted
                if owing and quick_ack and self.got_request:
                    transport.quick_ack()
                try:
                    data = receive()
                except _SOCKET_TIMEOUT:
                    if self.owes_input(parser):
                        raise
                    continue    # what was owed ended meanwhile (answered)
                for rtype, request_id, content in feed(data):
                    handler = handlers.get(rtype)
                    if handler is None:
                        self.on_unknown_type(rtype, request_id, content)
                    else:
                        handler(request_id, content)
                if not data:
                    break
                if len(data) == transport.recv_size:    # more is waiting:
                    gevent.sleep(0)     # others (its requests) run first
        except ProtocolError as exc:
            logger.warning('%s: protocol error, connection closed: %s',
                           self, exc)
        except _SOCKET_TIMEOUT:
            if not self.closed:
                logger.warning('%s: nothing received for %gs with a request '
                               'unfinished: closed', self, read_timeout)
        except OSError as exc:
            if not self.closed:
                logger.info('%s: connection lost: %s', self, exc)
        finally:
            self.close()

    # -- management records (request id 0) ----------------------------------

    def on_get_values(self, request_id: int, content: bytes) -> None:
        """Answer with the values we know; unknown names are left out (4.1)."""
        if request_id:
            self.on_unknown_type(FCGI_GET_VALUES, request_id, content)
            return
        settings = self.server.settings
        self.transport.send(encode_get_values_result(content, {
            FCGI_MAX_CONNS: str(settings.max_conns),
            FCGI_MAX_REQS: str(settings.max_reqs), FCGI_MPXS_CONNS: '1'}))

    def on_unknown_type(self, record_type: int, request_id: int,
                        content: bytes) -> None:
        """A type not in the table (or a management type on a request):
        answered UNKNOWN_TYPE on request id 0 (4.2), an error on an active
        request, ignored on an inactive one (3.3)."""
        if not request_id:
            self.transport.send(encode_records(
                FCGI_UNKNOWN_TYPE, FCGI_NULL_REQUEST_ID,
                _UNKNOWN_TYPE_BODY.pack(record_type)))
        elif request_id in self.requests:
            raise ProtocolError('unexpected record type %d for request %d'
                                % (record_type, request_id))

    # -- application records --------------------------------------------------

    def on_begin_request(self, request_id: int, content: bytes) -> None:
        if not request_id:
            self.on_unknown_type(FCGI_BEGIN_REQUEST, request_id, content)
            return
        role, keep_conn = decode_begin_request(content)
        if request_id in self.requests:
            raise ProtocolError('BEGIN_REQUEST for request %d, which is '
                                'already active' % request_id)
        if self.closing or self.closed:
            return      # our side is shut: the web server will see the close
        server = self.server
        if role not in server.settings.role:
            protocol_status, why = FCGI_UNKNOWN_ROLE, 'unknown role %d' % role
        elif server.active_requests >= server.settings.max_reqs:
            protocol_status, why = FCGI_OVERLOADED, (
                'overloaded (%d requests active)' % server.active_requests)
        elif self.abandoned:
            protocol_status, why = FCGI_OVERLOADED, (
                'the connection closes after a response cut short')
        else:
            request = self.requests[request_id] = Request(
                self, request_id, role, keep_conn)
            server.request_admitted(request)
            return
        logger.warning('%s: request %d refused: %s', self, request_id, why)
        server.request_refused(None, why)
        self.transport.send(encode_end_request(request_id, 0, protocol_status))
        if not keep_conn:
            self.close_write()

    def on_params(self, request_id: int, content: bytes) -> None:
        request = self.requests.get(request_id)
        if request is None or not request.add_params(content):
            return
        server = self.server
        if (server.pages and request_path(request.environ) in server.pages
                and 'full' not in request.environ.get('QUERY_STRING', '')):
            self.got_request = True
            run_request(request)    # ping, status: ahead of any queue (?full
            return                  # waits for the workers: it queues)
        if server.load is not None:
            # (a new connection waited to be accepted, unless for max_conns)
            server.load.admit(request, 0.0 if self.got_request or server.full()
                              else self.transport.waited())
        self.got_request = True
        request.greenlet = RequestGreenlets.of_this_hub().start(run_request,
                                                                request)

    def on_stdin(self, request_id: int, content: bytes) -> None:
        request = self.requests.get(request_id)
        if request is None or request.role == FCGI_AUTHORIZER:
            return
        if not content and request._stdin is None and request.params_done:
            request._stdin = _NO_INPUT      # no body, and nobody waits for one
            return
        request.add_input(request.stdin, content, 'STDIN')

    def on_data(self, request_id: int, content: bytes) -> None:
        request = self.requests.get(request_id)
        if request is not None and request.role == FCGI_FILTER:
            request.add_input(request.data, content, 'DATA')

    def on_abort_request(self, request_id: int, content: bytes) -> None:
        """Cancel that request and answer its END_REQUEST now (5.4); other
        requests on the connection go on."""
        request = self.requests.get(request_id)
        if request is not None:
            logger.info('%s: %r aborted by the web server', self, request)
            request.end(app_status=1, output=STDOUT_END[request_id])
            request.cancel()

    # -- the connection's lifetime -------------------------------------------

    def lost(self, exc: OSError) -> None:
        """A send failed: the connection is gone; say so once, close it."""
        if not self.closed:
            logger.info('%s: connection lost while sending: %s', self, exc)
            self.close()

    def close_write(self) -> None:
        """Our side is done: send FIN and let the web server close (so that
        nothing it sent late makes our close a reset), or close after
        linger_timeout."""
        if self.closing or self.closed:
            return
        self.closing = True
        if not self.transport.shutdown_write():
            self.close()
            return
        timer = self._linger_timer = gevent.get_hub().loop.timer(
            self.linger_timeout)
        timer.start(self.close)

    def close(self) -> None:
        """Close; requests still running on it are cancelled."""
        if self.closed:
            return
        self.closed = True
        for timer in (self._linger_timer, self._drain_timer):
            if timer is not None:
                timer.close()
        current = gevent.getcurrent()
        for request in list(self.requests.values()):
            request.release()
            if request.greenlet is not current:
                request.cancel()
        self.transport.close()
        self.server.connection_closed(self)

    def close_when_idle(self, idle_time: float = 0.0) -> None:
        """For a stopping server.  Closing a kept-open connection races with
        the web server's next request on it, least likely right after an
        END_REQUEST and after ``idle_time`` idle (nginx reuses its most
        recently used connections first); requests meanwhile are served.  A
        half-close gives a request sent in the race an orderly end of
        stream (nginx retries it when it may), not a reset."""
        if self.requests or self.closing or self.closed:
            return          # end_request closes it after the last one
        remaining = self.last_active + idle_time - time.monotonic()
        if remaining <= 0:
            self.close_write()
            return
        if self._drain_timer is not None:
            self._drain_timer.close()
        self._drain_timer = gevent.get_hub().loop.timer(remaining)
        self._drain_timer.start(self.close_when_idle, idle_time)


# 8. Request handlers ---------------------------------------------------------
#
# A request handler is any callable taking a Request (IRequestHandler): it
# writes a CGI response to request.stdout and may return an int, the
# END_REQUEST appStatus.  WSGIRequestHandler is our own PEP 3333 driver, the
# fast path; WSGIRefRequestHandler runs the standard library's wsgiref.

# A status is three digits and a reason phrase (the reason may be empty);
# header names are RFC 9110 tokens; no control characters anywhere, so an
# application cannot split the response with CR/LF (as gevent's pywsgi).
_STATUS_RE = re.compile(r'[1-9][0-9][0-9](?: [^\x00-\x1f\x7f]*)?\Z')
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_HEADER_VALUE_BAD_RE = re.compile(r'[\x00-\x08\x0a-\x1f\x7f]')
_HTTPS_ON = frozenset(('on', '1', 'yes', 'true'))

# Statuses (with their codes) and header names that passed the checks, the
# same few again and again (bounded: odd ones cannot grow them).
_CHECKED_STATUSES = {}
_CHECKED_NAMES = set()


def check_response_start(status, headers) -> bool:
    """Refuse what start_response() must (PEP 3333 types, CR/LF that would
    split the response); True when the headers hold a Content-Length."""
    if status not in _CHECKED_STATUSES:
        if type(status) is not str:
            raise TypeError('status must be str, not %r' % (status,))
        if not _STATUS_RE.match(status):
            raise ValueError('status %r is not "NNN Reason"' % (status,))
        status.encode('latin-1')     # UnicodeEncodeError if it is not
        if len(_CHECKED_STATUSES) < 1000:
            _CHECKED_STATUSES[status] = int(status[:3])
    if type(headers) is not list:
        raise TypeError('headers must be a list, not %r' % (headers,))
    has_content_length = False
    for header in headers:
        if type(header) is not tuple or len(header) != 2:
            raise TypeError('header %r is not a (name, value) tuple'
                            % (header,))
        name, value = header
        if name not in _CHECKED_NAMES or type(value) is not str:
            if type(name) is not str or type(value) is not str:
                raise TypeError('header %r: name and value must be str'
                                % (header,))
            if not _HEADER_NAME_RE.match(name):
                raise ValueError('header name %r is not a valid token'
                                 % name)
            if len(_CHECKED_NAMES) < 1000:
                _CHECKED_NAMES.add(name)
        # (isprintable(): a quick yes for nearly every value; the regex
        # then allows tabs and latin-1's non-printing characters)
        if not value.isprintable() and _HEADER_VALUE_BAD_RE.search(value):
            raise ValueError('header %s: value %r holds control '
                             'characters (CR/LF?)' % (name, value))
        if len(name) == 14 and name.lower() == 'content-length':
            has_content_length = True
    return has_content_length


class ErrorStream:
    """``wsgi.errors``: text sent on FCGI_STDERR, to the web server's log."""

    __slots__ = ('_request',)

    def __init__(self, request: Request) -> None:
        self._request = request

    def write(self, text) -> int:
        self._request.stderr.write(text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self._request.stderr.write(line)

    def flush(self) -> None:
        self._request.stderr.flush()


def _wsgi_url_scheme(environ: Dict[str, str]) -> str:
    # Web servers say HTTPS as "on", "ON", "1", or only through REQUEST_SCHEME.
    return 'https' if (environ.get('HTTPS', '').lower() in _HTTPS_ON or
                       environ.get('REQUEST_SCHEME', '').lower() == 'https') \
        else 'http'


_CGI_DEFAULTS = {'SCRIPT_NAME': '', 'PATH_INFO': '', 'QUERY_STRING': '',
                 'REQUEST_METHOD': 'GET', 'SERVER_PROTOCOL': 'HTTP/1.1',
                 'SERVER_NAME': 'localhost', 'SERVER_PORT': '80'}
_WSGI_CONSTANTS = {
    'wsgi.version': (1, 0), 'wsgi.run_once': False,
    # Greenlets run requests concurrently in one process: for the
    # application that is what threads would be.
    'wsgi.multithread': True, 'wsgi.file_wrapper': FileWrapper,   # stdlib's
    'wsgi.input_terminated': True}


class WSGIRequestHandler:
    """Runs a WSGI application (PEP 3333); ``debug`` sends a failure's
    traceback to the client.  The environ also holds ``fastcgi.role``,
    ``fastcgi.data`` and ``fastcgi.request``."""

    def __init__(self, app, debug: bool = False) -> None:
        if not callable(app):
            raise TypeError('WSGI application %r is not callable' % (app,))
        self.app = app
        self.debug = debug

    def __repr__(self) -> str:
        return '<%s for %r>' % (type(self).__name__, self.app)

    def make_environ(self, request: Request) -> Dict:
        environ = request.environ = {**_CGI_DEFAULTS, **request.environ,
                                     **_WSGI_CONSTANTS}
        environ['wsgi.url_scheme'] = _wsgi_url_scheme(environ)
        environ['wsgi.input'] = request.stdin
        environ['wsgi.errors'] = ErrorStream(request)
        environ['wsgi.multiprocess'] = request.server.multiprocess
        environ['fastcgi.role'] = ROLE_NAMES.get(request.role,
                                                 str(request.role))
        environ['fastcgi.data'] = request.data
        environ['fastcgi.request'] = request
        return environ

    def __call__(self, request: Request) -> int:
        environ = self.make_environ(request)
        response = WSGIResponse(request, environ)
        try:
            result = self.app(environ, response.start_response)
            try:
                response.send_body(result)
            finally:
                close = getattr(result, 'close', None)
                if close is not None:
                    close()
            response.finish()
            return 0
        except (RequestAborted, ConnectionClosed, RequestTimeout):
            raise
        except BaseException:
            response.fail(sys.exc_info(), self.debug)
            return 1


class WSGIResponse:
    """The state of one WSGI response: start_response, write() and the
    iteration of the application's result."""

    __slots__ = ('request', 'stdout', 'is_head', 'status', 'headers',
                 'headers_sent', 'has_content_length')

    def __init__(self, request: Request, environ: Dict) -> None:
        self.request = request
        self.stdout = request.stdout
        self.is_head = environ['REQUEST_METHOD'] == 'HEAD'
        self.status = self.headers = None
        self.headers_sent = self.has_content_length = False

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError('start_response() called a second time '
                                 'without exc_info')
        self.has_content_length = check_response_start(status, headers)
        self.status, self.headers = status, headers
        return self.write

    def _header_block(self, content_length=None) -> bytes:
        head = ''.join([name + ': ' + value + '\r\n'
                        for name, value in self.headers])
        if (content_length is not None and not self.has_content_length
                and self.status[0] != '1'
                and self.status[:3] not in ('204', '304')):
            head += 'Content-Length: %d\r\n' % content_length
        return ('Status: ' + self.status + '\r\n' + head + '\r\n').encode(
            'latin-1')

    def _send(self, data: bytes, content_length=None) -> None:
        if not self.headers_sent:
            if self.status is None:
                raise AssertionError('the application sent body bytes '
                                     'before calling start_response()')
            head = self._header_block(content_length)
            # (the stream need not read the head: we say what it is)
            self.stdout.head_size = self.stdout.bytes_written + len(head)
            self.request.response_status = (_CHECKED_STATUSES.get(self.status)
                                             or int(self.status[:3]))
            self.stdout.write(head)
            self.headers_sent = True
        if data and not self.is_head:
            self.stdout.write(data)

    def write(self, data: bytes) -> None:
        """The write() callable start_response returns: sent as soon as the
        application waits, or with the end of the response."""
        if type(data) is not bytes:
            raise TypeError('write() takes bytes, not %s' % type(data).__name__)
        self._send(data)
        self.stdout.flush_soon()

    def send_body(self, result) -> None:
        if type(result) in (list, tuple):
            # Everything is here already: send it together, with a length.
            total = 0
            for chunk in result:
                if type(chunk) is not bytes:
                    raise _not_bytes(chunk)
                total += len(chunk)
            if self.headers_sent or self.status is None:
                for chunk in result:
                    self._send(chunk)
            else:
                self._send(b''.join(result), total)
            return
        # An iterator may block between blocks: each block leaves as soon as
        # the application waits (PEP 3333: "must not delay the transmission
        # of any block"), or with the end of the response when none comes
        # between (what Flask and Django return: one write, not two; a
        # file's blocks, which never wait, leave flush_size at a time).
        flush_soon = self.stdout.flush_soon
        for chunk in result:
            if type(chunk) is not bytes:
                raise _not_bytes(chunk)
            if chunk:
                self._send(chunk)
                flush_soon()

    def finish(self) -> None:
        if not self.headers_sent:
            self._send(b'', 0)

    def fail(self, exc_info, debug: bool) -> None:
        request = self.request
        logger.error('%s: application failed on %r', request.connection,
                     request, exc_info=exc_info)
        body = ''.join(traceback.format_exception(*exc_info)).encode(
            'utf-8', 'backslashreplace') if debug else ERROR_BODY
        # When some of the response has been sent, it is too late for an
        # error page: the response is cut.
        request.answer_error(ERROR_STATUS, body)


def _not_bytes(chunk) -> TypeError:
    shown = chunk[:40] if isinstance(chunk, str) else chunk
    return TypeError('WSGI application returned %s, not bytes: %r; encode '
                     'the body (PEP 3333)' % (type(chunk).__name__, shown))


class WSGIRefRequestHandler:
    """Runs a WSGI application through wsgiref.handlers.BaseCGIHandler."""

    def __init__(self, app) -> None:
        if not callable(app):
            raise TypeError('WSGI application %r is not callable' % (app,))
        self.app = app

    def __call__(self, request: Request) -> None:
        handler = _WSGIRefHandler(
            request.stdin, request.stdout, ErrorStream(request),
            request.environ, multithread=True,
            multiprocess=request.server.multiprocess)
        handler.request = request
        handler.run(self.app)


class _WSGIRefHandler(BaseCGIHandler):
    # Without this the worker's own environment (secrets included) would be
    # copied into every request's environ.
    os_environ = {}
    _in_headers = False

    def send_headers(self):
        self._in_headers = True
        try:
            super().send_headers()
        finally:
            self._in_headers = False

    def _write(self, data):
        # A HEAD response carries headers only (HAProxy: 502 if a body).
        if self._in_headers or self.environ['REQUEST_METHOD'] != 'HEAD':
            self.stdout.write(data)

    def start_response(self, status, headers, exc_info=None):
        # The checks of our own driver, and latin-1 values (wsgiref finds
        # out only while it writes them, after the headers count as sent).
        check_response_start(status, headers)
        for _, value in headers:
            value.encode('latin-1')
        return super().start_response(status, headers, exc_info)

    def handle_error(self):
        exc = sys.exc_info()[1]
        if isinstance(exc, (RequestAborted, ConnectionClosed,
                            RequestTimeout)):
            raise       # not the application's failure: run_request's
        if not self.headers_sent:
            super().handle_error()
            return
        self.log_exception(sys.exc_info())
        # an error page if nothing has left yet, else the response is cut
        self.request.answer_error(ERROR_STATUS, ERROR_BODY)

    def log_exception(self, exc_info):
        logger.error('%s: application failed on %r', self.request.connection,
                     self.request, exc_info=exc_info)


# 9. Options and applications -------------------------------------------------
#
# One table (after waitress's adjustments) gives every setting's keyword,
# command-line flag, conversion of a value or its text, default and help.
# FastCGIServer, the command line, Paste and Django all read it, so a setting
# is spelt, checked and defaulted the same everywhere.  Two names look alike
# and are not: max_reqs is FCGI_MAX_REQS, requests a process serves at once
# (the original project's key); max_requests is gunicorn's, how many a
# worker serves before it retires.

def _to_bool(text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ('1', 'yes', 'y', 'on', 'true', 't'):
        return True
    if value in ('0', 'no', 'n', 'off', 'false', 'f', ''):
        return False
    raise ValueError('%r is not a boolean: use yes/no, on/off, true/false '
                     'or 1/0' % (text,))


def _to_number(text, kind, what: str, least=0, positive=False):
    try:
        if isinstance(text, bool):
            raise ValueError
        value = kind(str(text).strip())
    except ValueError:
        raise ValueError('%r is not %s' % (text, what)) from None
    if value < least or (positive and value <= 0):
        raise ValueError('%r is not %s %s' % (text, what, 'above 0' if positive
                                              else 'of at least %d' % least))
    return value


def _to_int(least: int):
    def convert(text) -> int:
        return _to_number(text, int, 'a whole number', least)
    return convert


def _to_float(text) -> float:
    return _to_number(text, float, 'a number of seconds')


def _to_seconds(text) -> float:
    return _to_number(text, float, 'a number of seconds', positive=True)


def _to_mode(text) -> int:
    """0660, 660, 0o660: octal (an int is taken as it is)."""
    try:
        value = text if type(text) is int else int(str(text).strip(), 8)
    except ValueError:
        raise ValueError('%r is not an octal file mode such as 0660'
                         % (text,)) from None
    if not 0 <= value <= 0o777:
        raise ValueError('%r is not a file mode between 000 and 777' % (text,))
    return value


def _to_role(value) -> frozenset:
    """FCGI_* ints or names ('responder'): one, a list, or comma-separated."""
    if isinstance(value, str):
        value = re.split(r'[,\s]+', value.strip())
    elif isinstance(value, int):
        value = [value]
    by_name = {name.lower(): number for number, name in ROLE_NAMES.items()}
    roles = frozenset(by_name.get(str(item).lower(), item) for item in value)
    if not roles or not roles <= ROLE_NAMES.keys():
        raise ValueError('unknown role in %r: use responder, authorizer or '
                         'filter (FCGI_RESPONDER...: 1, 2, 3)' % (value,))
    return roles


def _to_workers(text) -> int:
    return (len(os.sched_getaffinity(0)) if str(text).strip().lower() == 'auto'
            else _to_int(1)(text))


def _to_script_name(text) -> str:
    script_name = str(text).rstrip('/')
    if script_name and not script_name.startswith('/'):
        raise ValueError('%r neither is empty nor starts with /' % (text,))
    return script_name


def _to_path(text) -> str:
    if not str(text).startswith('/'):
        raise ValueError('%r does not start with /' % (text,))
    return str(text)


def _to_access_log(value):
    return value if value is None or isinstance(value, bool) else str(value)


def _optional(convert):
    """For settings where None means something (no limit, off)."""
    def convert_optional(value):
        return None if value is None else convert(value)
    convert_optional.takes_none = True
    return convert_optional


def parse_address(text: str):
    """'host:port', '[v6]:port', ':port' (all interfaces), 'unix:/path', a
    path, or 'fd://N' (an inherited listening socket) -> FastCGIServer's."""
    text = text.strip()
    if text.startswith('fd://'):
        try:
            return int(text[5:])
        except ValueError:
            raise ValueError('%r: fd://N takes a file descriptor number'
                             % text) from None
    if text.startswith('unix:'):
        return text[5:]
    if text.startswith(('/', './', '../')):
        return text
    match = re.match(r'\[([0-9A-Fa-f:.%a-zA-Z]+)\]:(\d+)\Z', text)
    if match is None:
        match = re.match(r'([^:\[\]]*):(\d+)\Z', text)
    if match is None:
        raise ValueError('%r is not host:port, [ipv6]:port or unix:/path'
                         % text)
    port = int(match.group(2))
    if port > 65535:
        raise ValueError('port %d is over 65535' % port)
    return (match.group(1) or '0.0.0.0', port)


def _to_hook(value):
    if not callable(value):
        raise ValueError('%r is not callable' % (value,))
    return value


#: gunicorn's server hooks, named and called as gunicorn calls them: settings
#: (in a --config file, or keywords of FastCGIServer) and events of the
#: server's seam (FastCGIServer's section)
HOOKS = ('on_starting', 'when_ready', 'pre_fork', 'post_fork',
         'post_worker_init', 'worker_exit', 'child_exit', 'on_reload',
         'pre_request', 'post_request', 'worker_abort')


class Option(NamedTuple):
    name: str           # FastCGIServer keyword and Paste/Django key
    flag: Optional[str]  # command-line flag (None: not on the command line)
    convert: object     # value or text -> value; ValueError says why not
    default: object
    help: str


SERVER_OPTIONS = [
    Option('num_workers', '--workers', _to_workers, 1, 'worker processes '
           'under a master, or auto: one per CPU (default: no master)'),
    Option('max_conns', '--max-conns', _to_int(1), 1024,
           'connections a process serves at once (default 1024)'),
    Option('max_reqs', '--max-reqs', _to_int(1), 1024, 'requests a process '
           'serves at once; more get FCGI_OVERLOADED (default 1024)'),
    Option('socket_mode', '--socket-mode', _optional(_to_mode), None,
           'permissions of a unix socket, octal, e.g. 0660'),
    Option('backlog', '--backlog', _to_int(1), 128,
           'listen() backlog (default 128)'),
    Option('role', '--role', _to_role, frozenset((FCGI_RESPONDER,)),
           'responder (default), authorizer, filter: one or several'),
    Option('spool_size', '--spool-size', _to_int(0), DEFAULT_SPOOL_SIZE,
           'unread request body bytes kept in memory (default 1048576)'),
    Option('max_params_size', '--max-params-size', _to_int(1), 1024 * 1024,
           'FCGI_PARAMS bytes a request may have, or 431 (default 1048576)'),
    Option('max_params', '--max-params', _to_int(1), 10000,
           'FCGI_PARAMS a request may have, or 431 (default 10000)'),
    Option('stop_timeout', '--graceful-timeout', _to_float, 30.0,
           'seconds a stop waits for requests in flight (default 30)'),
    Option('max_requests', '--max-requests', _to_int(0), 0, 'a worker '
           'retires after this many requests, plus a random jitter'),
    Option('max_requests_jitter', '--max-requests-jitter', _to_int(0), 0,
           'the most that jitter may be (default 0)'),
    Option('queue_timeout', '--queue-timeout', _to_float, 0.1, 'when '
           'requests keep waiting longer for the CPU, 503 at once (0: off)'),
    Option('request_timeout', '--request-timeout', _optional(_to_seconds),
           None, 'seconds a request may run, or 504 (default: no limit)'),
    Option('slow_request', '--slow-request', _optional(_to_seconds), None,
           'log the stack of requests running longer (PHP-FPM\'s slowlog)'),
    Option('worker_timeout', '--timeout', _optional(_to_seconds), None,
           'seconds a worker\'s loop may stay blocked before it is replaced'),
    Option('socket_owner', '--socket-owner', _optional(str), None,
           'owner of a unix socket: user, user:group or :group'),
    Option('read_timeout', '--read-timeout', _optional(_to_seconds), 60.0,
           'seconds a web server may pause inside a request (default 60)'),
    Option('max_body_size', '--max-body-size', _optional(_to_int(0)), None,
           'request body bytes allowed, or 413 (default: no limit)'),
    Option('max_spool_size', '--max-spool-size', _to_int(0), 100 * 1024 * 1024,
           'unread body bytes one request may spool to disk, or 413'),
    Option('script_name', '--script-name', _optional(_to_script_name), None,
           'where the app is mounted (/prefix): SCRIPT_NAME, PATH_INFO'),
    Option('status_path', '--status-path', _optional(_to_path), None,
           'the status page: ?json, ?openmetrics, ?full (pm.status_path)'),
    Option('ping_path', '--ping-path', _optional(_to_path), None,
           'answer "pong" for this path: health checks (ping.path)'),
    Option('access_log', '--access-log', _to_access_log, None, 'access log '
           'file (combined format, then microseconds), or - for stdout'),
    Option('master', None, _optional(_to_bool), None, 'a master supervises '
           'the worker(s) (True), never (False) or as needs_master() says'),
] + [Option(name, None, _optional(_to_hook), None, "gunicorn's server hook")
     for name in HOOKS]
OPTIONS_BY_NAME = {option.name: option for option in SERVER_OPTIONS}


def convert_setting(where: str, name: str, convert, value):
    """convert(value), or a ValueError that names the setting."""
    try:
        return convert(value)
    except (ValueError, TypeError) as exc:
        flag = OPTIONS_BY_NAME[name].flag if name in OPTIONS_BY_NAME else None
        raise ValueError('%s: bad value for %s%s: %s' % (
            where, name, ' (%s)' % flag if flag else '', exc)) from None


class Settings:
    """Every setting of SERVER_OPTIONS, an attribute each: from ``options``
    (``given``: their names; values or their text, converted once, here) or
    its default, checked together (a contradiction is refused, naming both).
    A server reads them, never writes them (waitress's Adjustments)."""

    def __init__(self, options: Optional[Dict] = None,
                 where: str = 'FastCGIServer', unknown_error=ValueError):
        options = {name: value for name, value in (options or {}).items()
                   if value is not None}
        unknown = set(options) - set(OPTIONS_BY_NAME)
        if unknown:
            raise unknown_error('%s: unknown setting %s; known settings: %s'
                                % (where, ', '.join(map(repr, sorted(
                                    unknown))), ', '.join(OPTIONS_BY_NAME)))
        for option in SERVER_OPTIONS:
            value = options.get(option.name, option.default)
            if option.name in options:
                value = convert_setting(where, option.name, option.convert,
                                        value)
            setattr(self, option.name, value)
        self.given = frozenset(options)
        self.master = needs_master(self)
        for contradiction in self.contradictions():
            raise ValueError('%s: %s' % (where, contradiction))

    def contradictions(self) -> List[str]:
        """What these settings ask for that cannot be had together."""
        found = []
        if not self.master:
            needing = [name for name in ('max_requests', 'worker_timeout')
                       if getattr(self, name)]
            if self.num_workers > 1:
                needing.insert(0, 'num_workers %d' % self.num_workers)
            found += ['%s needs a master, and master is False' % name
                      for name in needing]
        if self.max_requests_jitter and not self.max_requests:
            found.append('max_requests_jitter %d without max_requests'
                         % self.max_requests_jitter)
        return found


def needs_master(settings) -> bool:
    """The one rule for a master: when asked, when num_workers is given (even
    1: gunicorn's way, a supervised worker), and for what replaces a worker
    (max_requests, worker_timeout)."""
    if settings.master is not None:
        return settings.master
    return bool('num_workers' in settings.given or settings.max_requests
                or settings.worker_timeout)


# Settings of the runner rather than of FastCGIServer.
HANDLERS = {'wsgi': 'WSGIRequestHandler', 'wsgiref': 'WSGIRefRequestHandler',
            'fastcgi': None}
MONKEY_PREFIX = 'gevent.monkey.'


def monkey_patch(names: Iterable[str]) -> None:
    """Call gevent.monkey.patch_<name>() for each name ('all', 'socket'...)."""
    from gevent import monkey
    for name in names:
        function = getattr(monkey, 'patch_' + name, None)
        if function is None or not callable(function):
            raise ValueError('gevent.monkey has no patch_%s' % name)
        function()


def make_handler(handler_name: str, app, debug: bool = False):
    """'wsgi' | 'wsgiref' | 'fastcgi' -> the request handler serving app."""
    if handler_name == 'wsgi':
        return WSGIRequestHandler(app, debug=debug)
    if handler_name == 'wsgiref':
        return WSGIRefRequestHandler(app)
    if handler_name == 'fastcgi':
        if not callable(app):
            raise TypeError('request handler %r is not callable' % (app,))
        return app
    raise ValueError('unknown handler %r: use wsgi, wsgiref or fastcgi'
                     % (handler_name,))


def load_app(spec: str):
    """'module:name', 'module:name.attr' or 'module:factory()' -> object;
    'module' alone means 'module:application'."""
    import pkgutil
    module_name, _, name = spec.partition(':')
    call = name.endswith('()')
    name = (name[:-2] if call else name) or 'application'
    obj = pkgutil.resolve_name('%s:%s' % (module_name, name))
    return obj() if call else obj


WORKER_BOOT_ERROR = 3


class AppLoader:
    """A request handler made, in each worker, from an import string."""

    def __init__(self, spec: str, handler: str = 'wsgi',
                 debug: bool = False) -> None:
        self.spec = spec
        self.handler = handler
        self.debug = debug

    def load(self):
        return make_handler(self.handler, load_app(self.spec), self.debug)

    def __call__(self, request):
        raise RuntimeError('AppLoader(%r) was not loaded' % self.spec)

    def __repr__(self) -> str:
        return self.spec


# 10. Listening sockets -------------------------------------------------------

def _remove_stale_unix_socket(path: str) -> None:
    """A socket file left by a crashed run is removed; one that a live server
    still listens on, or a file that is not a socket, stops start-up."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, '%s exists and is not a socket: remove it '
                      'or choose another path' % path)
    probe = _stdlib_socket.socket(_stdlib_socket.AF_UNIX)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        logger.info('removing stale unix socket %s', path)
        os.unlink(path)
        return
    except OSError:
        pass        # a live but busy listener: leave it alone
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, 'another server is listening on %s: stop '
                  'it or choose another path' % path)


def _unix_listener(path: str, backlog: int, socket_mode, socket_owner):
    """Created with ``socket_mode``, never with wider permissions in between,
    and given to ``socket_owner`` before its path appears."""
    # Bound to a private name, linked to the path once listening: a web
    # server started alongside never meets ECONNREFUSED (too long: as is).
    temp = '%s.%d~' % (path, os.getpid())
    temp = path if len(os.fsencode(temp)) > 107 else temp
    for name in {path, temp}:
        _remove_stale_unix_socket(name)
    sock = gevent.socket.socket(_stdlib_socket.AF_UNIX,
                                _stdlib_socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o077)
        os.umask(old_umask)
        if socket_mode is None:
            # Never world-writable (anyone could connect) unless asked.
            socket_mode = 0o777 & ~old_umask & ~0o002
        # Born with mode & ~umask: never more open than it will be.
        os.umask(0o777 & ~socket_mode)
        try:
            sock.bind(temp)
        finally:
            os.umask(old_umask)
        try:
            os.chmod(temp, socket_mode)
            if socket_owner:
                _chown(temp, socket_owner)
            sock.listen(backlog)
            if temp != path:
                os.link(temp, path)     # fails if taken, as bind() does
                os.unlink(temp)
        except BaseException:
            os.unlink(temp)             # ours: bound above
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def create_listener(address, backlog: int = 128, socket_mode=None,
                    socket_owner=None):
    """Bind and listen: ``address`` is (host, port) for TCP over IPv4 or IPv6
    or a str path for a unix socket."""
    if isinstance(address, (str, bytes, os.PathLike)):
        return _unix_listener(os.fsdecode(address), backlog, socket_mode,
                              socket_owner)
    if not (isinstance(address, tuple) and len(address) in (2, 4)):
        raise ValueError('address must be (host, port) or a unix socket '
                         'path, not %r' % (address,))
    host, port = address[:2]
    family, socktype, proto, _, sockaddr = _stdlib_socket.getaddrinfo(
        host or None, port, _stdlib_socket.AF_UNSPEC,
        _stdlib_socket.SOCK_STREAM, 0, _stdlib_socket.AI_PASSIVE)[0]
    sock = gevent.socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(_stdlib_socket.SOL_SOCKET,
                        _stdlib_socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def inherited_listener(fd: int):
    """The listening socket on file descriptor ``fd``, as left to us by
    systemd, spawn-fcgi or a web server that starts FastCGI apps."""
    try:
        sock = gevent.socket.socket(fileno=fd)
    except OSError as exc:
        raise OSError(exc.errno, 'fd %d is not a socket: %s'
                      % (fd, exc.strerror)) from None
    if not sock.getsockopt(_stdlib_socket.SOL_SOCKET,
                           _stdlib_socket.SO_ACCEPTCONN):
        sock.detach()
        raise ValueError('fd %d is a socket but not a listening one' % fd)
    return sock


def _web_server_addrs():
    """FCGI_WEB_SERVER_ADDRS (section 3.2): the peers allowed to connect,
    or None when it is not set."""
    import ipaddress
    text = os.environ.get('FCGI_WEB_SERVER_ADDRS')
    if text is None:
        return None
    try:
        return {_unmapped(ipaddress.ip_address(item.strip()))
                for item in text.split(',') if item.strip()}
    except ValueError as exc:
        raise ValueError('FCGI_WEB_SERVER_ADDRS: %s' % exc) from None


def _unmapped(address):
    """'::ffff:127.0.0.1' is the IPv4 address it names."""
    return getattr(address, 'ipv4_mapped', None) or address


def peer_allowed(address, allowed) -> bool:
    """Is this peer among FCGI_WEB_SERVER_ADDRS (``allowed``; None: all
    are)?  A connection that is not TCP/IP is not (section 3.2)."""
    import ipaddress
    if allowed is None:
        return True
    try:
        peer = ipaddress.ip_address(address[0].split('%')[0])
    except (ValueError, TypeError, IndexError, AttributeError):
        peer = None
    if peer is None or _unmapped(peer) not in allowed:
        logger.warning('connection from %s refused: not in '
                       'FCGI_WEB_SERVER_ADDRS', address or 'a unix socket')
        return False
    return True


def _chown(path: str, owner: str) -> None:
    """socket_owner 'user', 'user:group' or ':group' (names or ids)."""
    import grp
    import pwd
    user, _, group = owner.partition(':')
    try:
        uid = -1 if not user else (int(user) if user.isdigit()
                                   else pwd.getpwnam(user).pw_uid)
        gid = -1 if not group else (int(group) if group.isdigit()
                                    else grp.getgrnam(group).gr_gid)
    except KeyError as exc:
        raise ValueError('socket_owner %r: no such user or group: %s'
                         % (owner, exc)) from None
    os.chown(path, uid, gid)


def take_inherited_listeners() -> List[int]:
    """The fds of the listening sockets this process was started with,
    taken (LISTEN_* leave the environment): systemd's (LISTEN_FDS for our
    pid), else fd 0 when it listens
    (FCGI_LISTENSOCK_FILENO: spawn-fcgi, lighttpd's bin-path, mod_fcgid)."""
    if os.environ.get('LISTEN_PID') == str(os.getpid()):
        count = int(os.environ.get('LISTEN_FDS', '0'))
        for name in ('LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES'):
            os.environ.pop(name, None)      # not for our children
        return list(range(3, 3 + count))
    try:
        probe = _stdlib_socket.socket(fileno=FCGI_LISTENSOCK_FILENO)
        try:
            listening = probe.getsockopt(_stdlib_socket.SOL_SOCKET,
                                         _stdlib_socket.SO_ACCEPTCONN)
        finally:
            probe.detach()
    except OSError:
        return []
    return [FCGI_LISTENSOCK_FILENO] if listening else []


def open_listeners(addresses: list, settings) -> Tuple[list, List[str]]:
    """Listening sockets for ``addresses`` (sockets, fds, (host, port) or
    paths), and the unix socket files made; on failure, none is left."""
    listeners, unix_paths = [], []
    try:
        for address in addresses:
            if hasattr(address, 'accept'):          # a socket
                listeners.append(address)
            elif isinstance(address, int) and not isinstance(address, bool):
                listeners.append(inherited_listener(address))
            else:
                listeners.append(create_listener(
                    address, settings.backlog, settings.socket_mode,
                    settings.socket_owner))
                if listeners[-1].family == _stdlib_socket.AF_UNIX:
                    unix_paths.append(os.fsdecode(address))
                    _warn_if_shut_out(unix_paths[-1], settings.socket_owner)
    except BaseException:
        for listener in listeners:
            listener.close()
        for path in unix_paths:
            with suppress(OSError):
                os.unlink(path)
        raise
    if not listeners:
        raise ValueError('address: give at least one address')
    return listeners, unix_paths


def _warn_if_shut_out(path: str, socket_owner) -> None:
    mode = os.stat(path).st_mode
    if not mode & 0o002 and not (mode & 0o020 and socket_owner):
        logger.warning(
            'unix socket %s is mode %04o: a web server running as another '
            'user (nginx as www-data) gets "Permission denied" (502); give '
            'it --socket-mode 0660 with --socket-owner :www-data, or '
            '--socket-mode 0666', path, stat.S_IMODE(mode))


def describe_address(address) -> str:
    if isinstance(address, int):
        return 'fd://%d' % address
    if isinstance(address, tuple):
        return ('[%s]:%d' if ':' in address[0] else '%s:%d') % address[:2]
    return 'unix:%s' % address


# 11. Prefork master and workers ----------------------------------------------
#
# Two rooms, after gunicorn's arbiter.  The master (Arbiter) forks the
# workers, then only watches them: signal handlers queue the signal and wake
# the loop (select() on a pipe: no greenlet, no poll), which calls
# handle_<name>.  Everything a child does is worker_main().  Each worker,
# never the master, imports an import string (AppLoader), so a reload's
# workers import fresh code.  A worker's loop touches a heartbeat file: one
# blocked past worker_timeout is aborted, then killed.  Both tell the
# server's watchers what happens (pre_fork, child_exit...: gunicorn's hooks).

def tune_malloc(keep_free: int = 4 * DEFAULT_SPOOL_SIZE) -> None:
    """Two glibc settings, measured behind nginx (the operator's
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ win): blocks of 128 KB
    and more always get pages of their own (glibc raises that threshold as
    they are freed, and fragmentation grew RSS 20% in 10 minutes of
    bench/soak.py); up to ``keep_free`` bytes freed at the top of the heap
    stay (with 128 KB, each 1 MB upload cost a brk() and 36 page faults)."""
    settings = ((-3, 'MALLOC_MMAP_THRESHOLD_', 128 * 1024),   # M_MMAP_THRESHOLD
                (-1, 'MALLOC_TRIM_THRESHOLD_', keep_free))    # M_TRIM_THRESHOLD
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        if not hasattr(libc, 'gnu_get_libc_version'):       # glibc only
            return
        for param, variable, value in settings:
            if variable not in os.environ:
                libc.mallopt(param, value)
    except (OSError, AttributeError):
        pass


HABITUAL_SIGNALS = ('SIGUSR1', 'SIGUSR2', 'SIGWINCH')


def become_server_process() -> None:
    """The process-wide changes of a process started to serve (run_server;
    never on import, nor in a program embedding a server), all here: a
    signal sent by habit (logrotate's USR1) must not kill it before its
    handlers are in; glibc's malloc tuned (tune_malloc)."""
    if threading.current_thread() is threading.main_thread():
        for name in HABITUAL_SIGNALS:
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    tune_malloc()


def reopen_log_files(server) -> None:
    """SIGUSR1 (logrotate's, as for nginx and gunicorn): reopen log files,
    logging's and those the server's watchers keep (the access log)."""
    named = logging.Logger.manager.loggerDict.values()
    for log in [logging.getLogger()] + [log for log in named
                                        if isinstance(log, logging.Logger)]:
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                # setStream() flushes, and returns the old stream or None
                with suppress(AttributeError):
                    handler.setStream(handler._open()).close()
    for tell in server.watchers.reopen_logs:
        tell()


def handle_signals(server, reload: str, worker: bool = False) -> list:
    """Signals of a serving process: TERM, INT stop gracefully, a second one
    (not in a worker: Ctrl-C and KillMode=control-group signal it with its
    master) or QUIT at once; USR1 reopens logs; HUP, USR2, WINCH logged."""
    def ignored(name, what):
        logger.info('%d: %s ignored%s', os.getpid(), name, what)
    escalate = not worker
    return [gevent.signal_handler(signal.SIGTERM, server.shutdown, False,
                                  escalate),
            gevent.signal_handler(signal.SIGINT, server.shutdown, False,
                                  escalate),
            gevent.signal_handler(signal.SIGQUIT, server.shutdown, True),
            gevent.signal_handler(signal.SIGUSR1, reopen_log_files, server),
            gevent.signal_handler(signal.SIGHUP, ignored, 'SIGHUP', reload),
            gevent.signal_handler(signal.SIGUSR2, ignored, 'SIGUSR2', ''),
            gevent.signal_handler(signal.SIGWINCH, ignored, 'SIGWINCH', '')]


def sd_notify(state: str) -> None:
    """systemd's Type=notify, without a dependency: a datagram to the
    socket NOTIFY_SOCKET names."""
    path = os.environ.get('NOTIFY_SOCKET')
    if path:
        try:
            with _stdlib_socket.socket(_stdlib_socket.AF_UNIX,
                                       _stdlib_socket.SOCK_DGRAM) as sock:
                sock.connect('\0' + path[1:] if path[0] == '@' else path)
                sock.send(state.encode())
        except OSError as exc:
            logger.warning('NOTIFY_SOCKET %s: %s', path, exc)


class Worker:
    """A worker process, as the master records it and server hooks see it."""

    log = logger        # as gunicorn's: worker.log.info() in a hook

    def __init__(self, generation: int = 0, heartbeat=None) -> None:
        self.pid = 0
        self.generation = generation
        self.heartbeat = heartbeat      # a temporary file its loop touches
        self.started = time.monotonic()
        self.booted = False             # its heartbeat has begun
        self.retiring = False           # sent SIGTERM
        self.aborted = False            # sent SIGABRT for worker_timeout
        self.exit_cause = None          # once reaped: why it is gone
        self.slot = 1                   # 1..: the lowest no other one has


class WorkerTable:
    """The master's decisions about its workers: how many of which
    generation run, spawning (pre_fork), retiring, reaping (child_exit: why
    each went), heartbeats, reloads that cannot boot.  It acts through
    fork(), reap() and kill(), which the tests replace with fakes, and never
    stops the master: reap_workers() says when the master must."""

    def __init__(self, arbiter: 'Arbiter') -> None:
        self.arbiter = arbiter
        self.server = arbiter.server
        self.watchers = arbiter.server.watchers
        self.wanted = self.server.settings.num_workers
        self.workers: Dict[int, Worker] = {}
        self.generation = 0
        self.served = False     # a worker booted: boot failures are retried
        self.boot_delay = 0     # seconds, doubling with each boot failure
        self.spawn_after = 0.0  # no spawning before (monotonic)
        self.ready = None       # the generation that last became ready

    def __iter__(self):
        return iter(list(self.workers.values()))

    def current(self) -> List[Worker]:
        return [w for w in self.workers.values()
                if w.generation == self.generation and not w.retiring]

    def spawn_workers(self) -> None:
        current = self.current()
        while len(current) < self.wanted and time.monotonic() >= \
                self.spawn_after:
            current.append(self.spawn_worker())
        # TTOU: the oldest of the current generation go first
        for worker in sorted(current, key=lambda w: w.started)[
                :max(0, len(current) - self.wanted)]:
            self.retire(worker, 'there are more workers than wanted')

    def spawn_worker(self) -> Worker:
        worker = Worker(self.generation, tempfile.TemporaryFile(
            prefix='gevent-fastcgi-'))
        os.utime(worker.heartbeat.fileno(), (0, 0))
        worker.slot = min(set(range(1, len(self.workers) + 2))
                          - {w.slot for w in self.workers.values()})
        for tell in self.watchers.pre_fork:
            tell(self.server, worker)
        # The master's signals wait until the child has reset its
        # handlers: one that came in between would run the master's
        # handler in the child, and a worker told to stop while it booted
        # would serve on.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [
            getattr(signal, name) for name in Arbiter.SIGNALS])
        try:
            worker.pid = self.fork()
            if worker.pid == 0:
                worker_main(self.arbiter, worker, mask)     # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[worker.pid] = worker
        logger.info('worker %d started (generation %d)', worker.pid,
                    self.generation)
        return worker

    def fork(self) -> int:
        # Not gevent.fork(): it starts a libev child watcher, and libev
        # then takes SIGCHLD from us: a dead worker would wait a poll.
        return gevent.os.fork_gevent()

    def retire(self, worker: Worker, why: str) -> None:
        if not worker.retiring:
            worker.retiring = True
            logger.info('worker %d: stopping gracefully: %s', worker.pid, why)
            self.kill(worker.pid, signal.SIGTERM)

    def signal_all(self, sig: int) -> None:
        for worker in self:
            self.kill(worker.pid, sig)

    def finish_reload(self) -> None:
        """Once the current generation has booted, the server is ready
        (READY=1, the when_ready hook) and the old generations drain."""
        current = self.current()
        if (len(current) < self.wanted or self.ready == self.generation
                or not all(w.booted for w in current)):
            return
        if self.ready is None:
            for tell in self.watchers.when_ready:
                tell(self.server)
        self.ready = self.generation
        sd_notify('READY=1\nMAINPID=%d' % os.getpid())
        for worker in self:
            if worker.generation < self.generation:
                self.retire(worker, 'replaced by generation %d'
                            % self.generation)

    def reap(self) -> Tuple[int, int]:
        """(pid, status) of a worker that has exited, or (0, 0)."""
        try:
            return os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 0, 0

    def reap_workers(self, running: bool = True) -> bool:
        """Reap the workers that have exited, saying why each went (when
        ``running``); True when one could not boot and none ever did."""
        cannot_boot = False
        while True:
            pid, status = self.reap()
            worker = self.workers.pop(pid, None)
            if not pid:
                return cannot_boot
            if worker is not None:
                cannot_boot |= self.worker_exited(worker, status, running)

    def worker_exited(self, worker: Worker, status: int, running: bool) -> bool:
        worker.heartbeat.close()
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if code is None:
            logger.warning('worker %d killed by signal %s', worker.pid,
                           signal.Signals(os.WTERMSIG(status)).name)
            cause = 'signal'
        elif code:
            logger.warning('worker %d exited with status %d', worker.pid, code)
            cause = 'exit'
        else:
            logger.info('worker %d exited', worker.pid)
            cause = 'reload' if worker.retiring else 'max_requests'
        if running:
            worker.exit_cause = 'worker_timeout' if worker.aborted else cause
        for tell in self.watchers.child_exit:
            tell(self.server, worker)
        return code == WORKER_BOOT_ERROR and self.boot_failed(worker)

    def boot_failed(self, worker: Worker) -> bool:
        """A worker could not load the application: True when none ever
        could (the master stops), else a reload or replacement failed."""
        older = [w for w in self.workers.values()
                 if w.generation < worker.generation]
        if older:
            # A reload whose new code cannot start: keep the old workers
            # (they are retired only once every new one has booted).
            logger.error('worker %d failed to boot: reload abandoned, the '
                         'previous workers keep serving', worker.pid)
            for other in self:
                if other.generation >= worker.generation:
                    other.retiring = True
                    self.kill(other.pid, signal.SIGKILL)
            self.generation = max(w.generation for w in older)
            return False
        if not self.served:
            logger.error('worker %d failed to boot (see the error above): '
                         'stopping', worker.pid)
            return True
        # Code that served once and now fails to import (a broken deploy
        # found by a replacement worker): the workers that serve go on, and
        # the boot is tried again, less and less often.
        self.boot_delay = min(max(1, self.boot_delay * 2), 60)
        self.spawn_after = time.monotonic() + self.boot_delay
        logger.error('worker %d failed to boot (see the error above): %d '
                     'workers left; next try in %ds', worker.pid,
                     len(self.workers), self.boot_delay)
        return False

    def check_heartbeats(self) -> None:
        """Note workers that have booted; abort those whose event loop has
        been blocked past worker_timeout (SIGABRT: the worker_abort hook
        runs, if the loop lets it), and kill them at the next check."""
        timeout = self.server.settings.worker_timeout
        now = time.time()
        for worker in self:
            beat = os.fstat(worker.heartbeat.fileno()).st_mtime  # 0: none
            if beat and not worker.booted:
                worker.booted = self.served = True
                self.boot_delay = 0
            if worker.aborted:
                self.kill(worker.pid, signal.SIGKILL)
            elif timeout and beat and now - beat > timeout:
                logger.error('worker %d: event loop blocked for more than %gs '
                             '(worker_timeout): aborted; it wrote the stack of '
                             'the code blocking it above', worker.pid, timeout)
                worker.aborted = True
                self.kill(worker.pid, signal.SIGABRT)

    def kill(self, pid: int, sig: int) -> None:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)


class Arbiter:
    """The master process: keeps its WorkerTable serving, and takes
    README.rst's signals (TERM, INT, QUIT, HUP, TTIN, TTOU, USR1; USR2 and
    WINCH logged): handlers queue them, the loop calls handle_<name>."""

    SIGNALS = ('SIGTERM', 'SIGINT', 'SIGQUIT', 'SIGHUP', 'SIGTTIN',
               'SIGTTOU', 'SIGCHLD', 'SIGUSR1', 'SIGUSR2', 'SIGWINCH')
    STOP_SIGNALS = frozenset((signal.SIGTERM, signal.SIGINT, signal.SIGQUIT))

    def __init__(self, server, table=WorkerTable) -> None:
        self.server = server
        self.pid = os.getpid()
        self.workers = table(self)
        self.running = False    # serving: workers are replaced
        self.signal_queue: List[int] = []
        self.exit_status = 0
        self.wake_r = self.wake_w = None
        # workers wait for EOF on this pipe: we closed our listeners
        self.listening_r = self.listening_w = None

    def run(self) -> int:
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        self.listening_r, self.listening_w = os.pipe()
        for name in self.SIGNALS:
            signal.signal(getattr(signal, name), self._queue_signal)
        self.running = True
        logger.info('master %d: serving %s with %d workers', os.getpid(),
                    ', '.join(map(describe_address, self.server.addresses)),
                    self.workers.wanted)
        try:
            while self.running:
                self.step()
        except BaseException:
            self.exit_status = 1    # (a when_ready hook that failed...)
            self.stop(graceful=False)
            raise
        finally:
            for name in self.SIGNALS:
                signal.signal(getattr(signal, name), signal.SIG_DFL)
            for fd in (self.wake_r, self.wake_w, self.listening_r):
                os.close(fd)
            self._close_listeners()
            self.server.remove_unix_sockets()
            logger.info('master %d: stopped', os.getpid())
        return self.exit_status

    def step(self, timeout: float = 1.0) -> None:
        """One turn of the loop: the queued signals, then the workers."""
        import select
        while self.signal_queue and self.running:
            name = signal.Signals(self.signal_queue.pop(0)).name
            getattr(self, 'handle_' + name[3:].lower())()
        if not self.running:
            return
        workers = self.workers
        if workers.reap_workers():
            self.exit_status = WORKER_BOOT_ERROR
            self.stop(graceful=False)
            return
        workers.check_heartbeats()
        workers.finish_reload()
        workers.spawn_workers()
        with suppress(InterruptedError, BlockingIOError):
            select.select([self.wake_r], [], [], timeout)
            os.read(self.wake_r, 4096)

    def _queue_signal(self, signum, frame) -> None:
        if signum != signal.SIGCHLD:    # (it only wakes the loop, to reap)
            self.signal_queue.append(signum)
        with suppress(OSError):
            os.write(self.wake_w, b'.')

    def handle_term(self) -> None:
        logger.info('master %d: graceful stop', os.getpid())
        self.stop(graceful=True)

    handle_int = handle_term

    def handle_quit(self) -> None:
        logger.info('master %d: immediate stop', os.getpid())
        self.stop(graceful=False)

    def handle_hup(self) -> None:
        sd_notify('RELOADING=1')
        self.workers.generation += 1
        logger.info('master %d: reloading: starting worker generation %d',
                    os.getpid(), self.workers.generation)
        for tell in self.server.watchers.on_reload:
            tell(self.server)

    def handle_usr1(self) -> None:
        logger.info('master %d: reopening log files', os.getpid())
        reopen_log_files(self.server)
        self.workers.signal_all(signal.SIGUSR1)

    def handle_usr2(self) -> None:
        logger.warning('master %d: SIGUSR2 or SIGWINCH ignored (no binary '
                       'upgrade; SIGHUP reloads the application)', os.getpid())

    handle_winch = handle_usr2

    def handle_ttin(self, change: int = 1) -> None:
        self.workers.wanted = max(1, self.workers.wanted + change)
        logger.info('master %d: %d workers', os.getpid(), self.workers.wanted)

    def handle_ttou(self) -> None:
        self.handle_ttin(-1)

    def _close_listeners(self) -> None:
        """Our copies of the listening sockets close before the workers'
        (see FastCGIServer.stop): the last copy must be one that the
        backlog was just taken from, or what waits there is reset."""
        self.server.close()
        if self.listening_w is not None:
            os.close(self.listening_w)
            self.listening_w = None

    def stop(self, graceful: bool = True) -> None:
        """Stop every worker (gracefully: within graceful_timeout), then
        return; a second stop signal meanwhile makes it immediate."""
        sd_notify('STOPPING=1')
        self._close_listeners()
        self.running = False
        workers = self.workers
        workers.signal_all(signal.SIGTERM if graceful else signal.SIGQUIT)
        deadline = time.monotonic() + (
            self.server.settings.stop_timeout + 2 if graceful else 3)
        while workers.workers and time.monotonic() < deadline:
            if graceful and self.STOP_SIGNALS.intersection(self.signal_queue):
                logger.info('master %d: stopping at once', os.getpid())
                graceful = False
                workers.signal_all(signal.SIGQUIT)
                deadline = min(deadline, time.monotonic() + 3)
            workers.reap_workers(running=False)
            time.sleep(0.02)
        for worker in workers:
            logger.warning('worker %d did not stop in time: killed',
                           worker.pid)
            workers.kill(worker.pid, signal.SIGKILL)
        while workers.workers:
            workers.reap_workers(running=False)
            time.sleep(0.01)


def worker_main(arbiter: Arbiter, worker: Worker, mask) -> None:
    """Everything a worker does, from the fork to its exit (never returns):
    forget the master's state, load the application (or exit with
    WORKER_BOOT_ERROR), serve until told to stop or until max_requests."""
    server = arbiter.server
    worker.pid = os.getpid()
    status = 1
    try:
        for name in Arbiter.SIGNALS:
            # until the worker's own handlers: as an unsupervised process
            # would, except that a habit does not kill it
            signal.signal(getattr(signal, name), signal.SIG_IGN
                          if name in HABITUAL_SIGNALS else signal.SIG_DFL)
        signal.signal(signal.SIGABRT, lambda signum, frame: _abort_worker(
            server, worker))
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for fd in (arbiter.wake_r, arbiter.wake_w, arbiter.listening_w):
            os.close(fd)
        for other in arbiter.workers:
            other.heartbeat.close()
        for tell in server.watchers.post_fork:
            tell(server, worker)
        try:
            server.load_application()
        except Exception:
            logger.exception('worker %d: cannot load the application',
                             os.getpid())
            status = WORKER_BOOT_ERROR
            return
        tune_malloc()
        server.become_worker(worker, arbiter.listening_r)
        server.start()
        beat = heartbeat(server, worker.heartbeat.fileno(), arbiter.pid)
        handle_signals(server, ' (the master reloads)', worker=True)
        for tell in server.watchers.post_worker_init:
            tell(worker)
        server.serve_until_shutdown()
        beat.close()
        faulthandler.cancel_dump_traceback_later()
        status = 0
    except BaseException:
        logger.exception('worker %d failed', os.getpid())
    finally:
        for tell in server.watchers.worker_exit:
            tell(server, worker)
        logging.shutdown()
        os._exit(status)


def _abort_worker(server, worker: Worker) -> None:
    """SIGABRT, past worker_timeout: the worker_abort hook, then exit (a
    handler of signal's, not gevent's: the event loop is what is blocked)."""
    for tell in server.watchers.worker_abort:
        tell(worker)
    logging.shutdown()
    os._exit(1)


def heartbeat(server, fd: int, master: int):
    """Touch ``fd`` now and then from the event loop (a timer); stop once
    the master is gone (killed, out of memory): a worker left behind would
    serve old code and keep a new server from its address.  With
    worker_timeout, a watchdog thread (faulthandler's) writes the stack of
    the code blocking the loop just before the master aborts us for it."""
    timeout = server.settings.worker_timeout
    interval = min(1.0, timeout / 4.0) if timeout else 1.0

    def beat():
        if os.getppid() == master:
            os.utime(fd)
            if timeout:     # to the root logger's first file, or stderr
                faulthandler.dump_traceback_later(timeout - interval, file=next(
                    (handler.stream for handler in logging.getLogger().handlers
                     if isinstance(handler, logging.FileHandler)
                     and handler.stream), sys.stderr))
            return
        logger.error('worker %d: master %d is gone: stopping', os.getpid(),
                     master)
        timer.stop()
        server.shutdown()
    beat()
    timer = gevent.get_hub().loop.timer(interval, interval)
    timer.start(beat)
    return timer


# 12. FastCGIServer -----------------------------------------------------------
#
# The server's state is declared in one block and changes through its own
# methods only.  The request path and the master tell it what happens
# (request_admitted, request_ended, pre_fork...), and it tells its watchers:
# the one seam, which gunicorn's server hooks watch (under their names,
# called as gunicorn calls them), and what the next section subscribes.

#: the seam's events: gunicorn's server hooks, then the server's own (in a
#: process: serving from its start, stopped once drained; USR1)
EVENTS = HOOKS + ('connection_opened', 'connection_closed', 'request_refused',
                  'serving', 'stopped', 'reopen_logs')
#: a hook that raises stops the start; any other is logged, and ignored
STARTUP_HOOKS = frozenset(('on_starting', 'when_ready'))


class Watchers:
    """The seam: for each event (EVENTS), a tuple of the callables that
    watch it: one nobody watches costs its raiser one attribute check."""

    __slots__ = EVENTS

    def __init__(self) -> None:
        for name in EVENTS:
            setattr(self, name, ())

    def add(self, event: str, function) -> None:
        setattr(self, event, getattr(self, event) + (function,))

    def add_hooks(self, settings) -> None:
        """The server hooks among ``settings`` (HOOKS)."""
        for name in HOOKS:
            hook = getattr(settings, name)
            if hook is not None:
                self.add(name, _guarded(name, hook))


def _guarded(name: str, hook):
    def guarded(*args) -> None:
        try:
            hook(*args)
        except Exception as exc:
            if name in STARTUP_HOOKS:
                raise StartupError('the %s hook failed: %s: %s' % (
                    name, type(exc).__name__, exc)) from exc
            logger.exception('server hook %s failed (the server goes on)', name)
    return guarded


class FastCGIServer(StreamServer):
    """Runs ``request_handler(request)`` for each request of the web servers
    that connect to ``address`` ((host, port), a unix socket path, a
    listening socket or its fd, or a list of these; bound at once).
    ``options``: SERVER_OPTIONS (hooks included), or a Settings.
    serve_forever() serves here, or runs a master and workers."""

    connection_class = Connection
    #: a stopping server closes a kept-open idle connection once it has been
    #: idle this long (Connection.close_when_idle says why)
    drain_idle_time = 0.5
    #: functions called with each new server, to watch what its settings
    #: switch on (the status page, logs: the next section adds them)
    watched_by: List = []

    def __init__(self, address, request_handler,
                 settings: Optional[Settings] = None, **options) -> None:
        if not callable(request_handler):
            raise TypeError('request_handler %r is not callable'
                            % (request_handler,))
        # An unknown keyword is a TypeError, as Python's own are; it must
        # never reach gevent, which takes extra keywords as SSL options.
        if settings is None:
            settings = Settings(options, unknown_error=TypeError)
        elif options:
            raise TypeError('give settings or keywords, not both')
        # The server's state (these change through its methods only):
        self.settings = settings
        self.request_handler = request_handler
        self.watchers = Watchers()
        self.pages = {}                 # path: a handler answering there
        self.multiprocess = settings.master     # (TTIN may add workers)
        self.worker = Worker()          # this process, as hooks see it
        self.active_requests = 0        # admitted, not yet released
        self.load = None                # a LoadShedder, once serving
        self.requests_served = 0        # handlers that have ended
        self.retire_after = 0           # a worker's max_requests, drawn
        self.stopping = False
        self.stop_timeout = settings.stop_timeout   # gevent's, and shutdown's
        self.connections = set()
        self.unix_paths = []            # socket files we made, and remove
        self.extra_listeners = []       # listeners beyond the first
        self.master_listening = None    # a worker's end of the master's pipe
        self.web_server_addrs = _web_server_addrs()
        self._bound_by_pid = os.getpid()
        self._stop_requested = gevent.event.Event()
        self._serve_on(address)
        if settings.ping_path is not None:      # health checks
            self.add_page(settings.ping_path, lambda request: request.stdout
                          .write(plain_response('200 OK', b'pong\n')))
        self.watchers.add_hooks(settings)
        for watch in self.watched_by:
            watch(self)

    def _serve_on(self, address) -> None:
        given = address if isinstance(address, list) else [address]
        listeners, self.unix_paths = open_listeners(given, self.settings)
        if self.multiprocess:
            # Several processes share the socket: each takes one connection
            # per wake-up so that the load spreads over them.
            self.max_accept = 1
        StreamServer.__init__(self, listeners[0], spawn=gevent.pool.Pool(
            self.settings.max_conns))
        # Further addresses: listeners of their own that share our pool
        # (max_conns), our handle and so our request count (max_reqs).
        for listener in listeners[1:]:
            extra = StreamServer(listener, self.handle, spawn=self.pool)
            extra.max_accept = self.max_accept
            self.extra_listeners.append(extra)
        for server, one in zip([self] + self.extra_listeners, given):
            if isinstance(one, (str, bytes, os.PathLike)):
                server.address = os.fsdecode(one)   # not the name it bound
        self.addresses = [self.address] + [extra.address
                                           for extra in self.extra_listeners]

    # -- what the request path and the master tell the server ---------------

    def handle(self, sock, address) -> None:
        if not peer_allowed(address, self.web_server_addrs):
            sock.close()
            return
        connection = self.connection_class(self, sock, address)
        self.connections.add(connection)
        for tell in self.watchers.connection_opened:
            tell(connection)
        if self.stopping:       # taken from the backlog by stop()
            connection.close_when_idle(self.drain_idle_time)
        connection.run()

    def connection_closed(self, connection) -> None:
        self.connections.discard(connection)
        for tell in self.watchers.connection_closed:
            tell(connection)

    def request_admitted(self, request: Request) -> None:
        """Its BEGIN_REQUEST was accepted: it counts against max_reqs."""
        self.active_requests += 1

    def request_released(self, request: Request) -> None:
        """It has left its connection (ended, or the connection closed)."""
        self.active_requests -= 1

    def request_refused(self, request: Optional[Request], why: str) -> None:
        """Refused at its BEGIN_REQUEST (no Request yet), or over a limit."""
        for tell in self.watchers.request_refused:
            tell(request, why)

    def request_started(self, request: Request):
        """In its greenlet, as its handler is about to run (pre_request):
        the handler, a page's at its path (ping, status) or the app."""
        for tell in self.watchers.pre_request:
            tell(self.worker, request)
        pages = self.pages
        if pages:
            return pages.get(request_path(request.environ),
                             self.request_handler)
        return self.request_handler

    def request_ended(self, request: Request) -> None:
        """Its handler has ended, its response out (or failed): watchers are
        told (post_request); a worker retires after max_requests."""
        self.requests_served += 1
        for tell in self.watchers.post_request:
            tell(self.worker, request, request.environ, request)
        if self.requests_served == self.retire_after:
            logger.info('worker %d: retiring after %d requests '
                        '(max_requests)', os.getpid(), self.requests_served)
            self.master_listening = None        # the master listens on
            self.shutdown(escalate=False)

    def add_page(self, path: str, handler) -> None:
        """``handler`` answers ``path``, ahead of the app: ping, status."""
        self.pages[path] = handler

    # -- serving --------------------------------------------------------------

    def start(self) -> None:
        if self.settings.queue_timeout:     # (its clock starts now)
            self.load = LoadShedder(self.settings.queue_timeout)
        StreamServer.start(self)
        for extra in self.extra_listeners:
            extra.start()
        for tell in self.watchers.serving:
            tell(self)

    def close(self) -> None:
        for extra in getattr(self, 'extra_listeners', ()):
            extra.close()
        StreamServer.close(self)

    def stop(self, timeout=None) -> None:
        """Stop accepting; idle connections close now, busy ones when their
        last request ends; what still runs after ``timeout`` (default
        graceful_timeout) is cancelled."""
        self.stopping = True
        self._stop_requested.set()
        for connection in list(self.connections):
            connection.close_when_idle(self.drain_idle_time)
        if self.master_listening is not None:
            # A worker: the master's copies of the listeners close first
            # (as it stops, and all may get the TERM at once: systemd's
            # KillMode=control-group); alone (a HUP), we stop after 1 s.
            with suppress(_SOCKET_TIMEOUT):
                gevent.socket.wait_read(self.master_listening, 1.0)
        # The last copy to close takes what the kernel accepted for us and
        # closes at once (TCP resets a handshake completed in between): the
        # close resets the backlog, where a web server may have sent a
        # request (nginx does not retry a POST it sent).  Later connections
        # are refused at once: the web server tries another.
        for server in [self] + self.extra_listeners:
            while not server.closed and (accepted := server.do_read()):
                server.do_handle(*accepted)
            server.close()
        try:
            StreamServer.stop(self, timeout)    # waits for the connections
        finally:
            self.remove_unix_sockets()
            for tell in self.watchers.stopped:
                tell(self)

    def remove_unix_sockets(self) -> None:
        # Only the process that made them: a worker's exit must not pull
        # the socket from under its master and siblings.
        if self._bound_by_pid == os.getpid():
            for path in self.unix_paths:
                with suppress(OSError):
                    os.unlink(path)
            self.unix_paths = []

    def shutdown(self, at_once: bool = False, escalate: bool = True) -> None:
        """Make serve_forever() stop: gracefully, or ``at_once`` (also on a
        second call, if ``escalate``) without waiting for what is in flight."""
        if at_once or (escalate and self._stop_requested.is_set()):
            self.stop_timeout = 0
            if self.stopping:       # already draining: cut it short
                for connection in list(self.connections):
                    connection.close()
        self._stop_requested.set()

    def serve_until_shutdown(self) -> None:
        """Serve in this process until shutdown() (or stop()) is called."""
        if not self.started:
            self.start()
        self._stop_requested.wait()
        self.stop()

    def load_application(self) -> None:
        """An import string (AppLoader) becomes its request handler."""
        if isinstance(self.request_handler, AppLoader):
            self.request_handler = self.request_handler.load()

    def become_worker(self, worker: Worker, master_listening: int) -> None:
        """This process is ``worker``, forked by a master: it retires after
        max_requests plus a jitter (drawn here: workers do not all retire at
        once); its graceful stop waits for the master's listeners to close."""
        self.worker = worker
        self.master_listening = master_listening
        max_requests = self.settings.max_requests
        if max_requests:
            self.retire_after = max_requests + random.randint(
                0, self.settings.max_requests_jitter)
            logger.info('worker %d: retires after %d requests (max_requests)',
                        os.getpid(), self.retire_after)

    def serve_forever(self, stop_timeout=None) -> int:
        """Serve until stopped (in the main thread: by handle_signals');
        return the exit status: 0, or WORKER_BOOT_ERROR."""
        if stop_timeout is not None:
            self.stop_timeout = stop_timeout
        for tell in self.watchers.on_starting:
            tell(self)
        if self.settings.master:
            return Arbiter(self).run()
        self.load_application()
        handlers = []
        if threading.current_thread() is threading.main_thread():
            handlers = handle_signals(self, ': there is no reload without '
                                      'a master (--workers)')
        try:
            self.worker.pid = os.getpid()
            self.start()
            for tell in self.watchers.when_ready:
                tell(self)
            sd_notify('READY=1\nMAINPID=%d' % os.getpid())
            self.serve_until_shutdown()
        finally:
            sd_notify('STOPPING=1')
            for handler in handlers:
                handler.cancel()
        return 0


# 13. Seeing inside: status page, metrics, access log, slow log ---------------
#
# What an operator sees, after PHP-FPM (its names where it has one): the
# status page over every worker (text, JSON, OpenMetrics), the access log,
# the slow log, all watching a server through its seam (watch_server()).
# Each process counts into a list and publishes to the scoreboard (shared
# memory mapped before the fork) four times a second; what a request waits
# in is computed only when ?full or the slow log asks.

access_logger = logging.getLogger('gevent_fastcgi.access')
_LOG_UNSAFE = re.compile('[^\x20-\x7e]|["\\\\]')


def _log_escape(text: str) -> str:
    """As nginx and Apache do: '"', '\\', control characters and non-ASCII
    as \\xHH, so that a client can neither forge fields nor send terminal
    escapes to whoever reads the log."""
    if text.isascii() and text.isprintable() and '"' not in text \
            and '\\' not in text:
        return text
    return _LOG_UNSAFE.sub(lambda match: '\\x%02X' % (ord(match.group())
                                                       & 0xFF), text)


class AccessLog:
    """One server's access log (combined format, then Apache's %D, the
    microseconds) to a file of its own, '-' (stdout) or True (the logger
    'gevent_fastcgi.access').  Not a logging handler, which an application
    that reconfigures logging (Django does) closes, nor logging's machinery,
    which cost as much as a request: lines go out a block at a time (every
    256 lines, four times a second, on stop, before SIGUSR1 reopens it)."""

    def __init__(self, target) -> None:
        self.target = target
        self.lines: List[str] = []
        self.file = None
        self._second = -1       # the time string, made once a second
        self._time = ''
        self.reopen()

    def reopen(self) -> None:
        self.close()
        if self.target == '-':
            self.file = sys.stdout
        elif self.target is not True:
            self.file = open(self.target, 'a', encoding='utf-8',
                             errors='backslashreplace')

    def log(self, request: Request, environ: Dict) -> None:
        get = environ.get
        uri = get('REQUEST_URI')
        if uri is None:
            uri = get('SCRIPT_NAME', '') + get('PATH_INFO', '')
            if get('QUERY_STRING'):
                uri += '?' + get('QUERY_STRING')
        started = request.started
        if int(started) != self._second:
            self._second = int(started)
            self._time = time.strftime('%d/%b/%Y:%H:%M:%S %z',
                                       time.localtime(started))
        fields = (get('REMOTE_ADDR', '-'), get('REMOTE_USER') or '-',
                  get('REQUEST_METHOD', '-'), uri, get('SERVER_PROTOCOL', '-'),
                  get('HTTP_REFERER', '-'), get('HTTP_USER_AGENT', '-'))
        text = ' '.join(fields)         # all checked at once: usually clean
        if not (text.isascii() and text.isprintable() and '"' not in text
                and '\\' not in text):
            fields = tuple(map(_log_escape, fields))
        address, user, method, uri, protocol, referer, agent = fields
        line = (f'{address} - {user} [{self._time}] "{method} {uri} '
                f'{protocol}" {request.response_status or "-"} '
                f'{request.response_bytes or "-"} "{referer}" "{agent}" '
                f'{int(request.duration * 1e6)}')
        if self.target is True:
            access_logger.info('%s', line)
            return
        self.lines.append(line)
        if len(self.lines) >= 256:
            self.flush()

    def flush(self) -> None:
        if self.lines and self.file is not None:
            lines, self.lines = self.lines, []
            self.file.write('\n'.join(lines) + '\n')
            self.file.flush()

    def close(self) -> None:
        self.flush()
        if self.file is not None and self.target != '-':
            self.file.close()
        self.file = None


#: request durations the status page counts (seconds; Prometheus' default
#: buckets)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)
#: what the scoreboard holds for the master, then in each worker's slot:
#: 'seq' of each is a seqlock's (odd while its writer writes); a slot's
#: counts are the fields from 'busy' on; 'listed' is the last 'lists_asked'
#: for which its worker published its requests in flight
BOARD_FIELDS = ('seq', 'started', 'generation', 'max_busy',
                'max_listen_queue', 'lists_asked', 'restarts_exit',
                'restarts_signal', 'restarts_max_requests',
                'restarts_worker_timeout', 'restarts_reload')
SLOT_FIELDS = ('seq', 'pid', 'generation', 'started', 'listed', 'busy', 'open',
               'accepted', 'served', '1xx', '2xx', '3xx', '4xx', '5xx',
               'aborted', 'timed_out', 'refused', 'shed', 'slow', 'bytes_in',
               'bytes_out', 'duration_us') + tuple(
                   'bucket_%d' % n for n in range(len(DURATION_BUCKETS) + 1))
_BOARD = {name: index for index, name in enumerate(BOARD_FIELDS)}
_SLOT = {name: index for index, name in enumerate(SLOT_FIELDS)}
_COUNTS = SLOT_FIELDS[_SLOT['busy']:]
_COUNT = {name: index for index, name in enumerate(_COUNTS)}
SLOT_TEXT = 16384       # bytes of each worker's requests in flight (?full)


class Scoreboard:
    """The status page's counters in memory mapped before the fork: the
    master's, and a slot per worker (its own to write, with a text area for
    its requests in flight); slot 0 holds those of workers gone.  Readers
    never see a fold or a slot half written (seqlocks): totals never fall."""

    def __init__(self, slots: int = 1024) -> None:
        import mmap
        self.slots = slots
        self.width = len(SLOT_FIELDS)
        size = len(BOARD_FIELDS) + (slots + 1) * self.width
        self.memory = mmap.mmap(-1, size * 8 + (slots + 1) * SLOT_TEXT)
        self.ints = memoryview(self.memory)[:size * 8].cast('q')
        self.text_at = size * 8
        self.slot = None        # this process's
        self['started'] = int(time.time())

    def base(self, slot: int) -> int:
        return len(BOARD_FIELDS) + slot * self.width

    def __getitem__(self, name: str) -> int:     # (a name of BOARD_FIELDS)
        return self.ints[_BOARD[name]]

    def __setitem__(self, name: str, value: int) -> None:
        self.ints[_BOARD[name]] = value

    def _begin(self, seq: int) -> int:
        """The seqlock at ``seq`` once its writer is not writing, however
        long that takes, unless it stays mid-write a second (it died there)."""
        stuck = give_up = None
        while True:
            value = self.ints[seq]
            if value != stuck:      # (odd: a writer, perhaps preempted)
                stuck, give_up = value, time.monotonic() + 1.0
            if not value & 1 or time.monotonic() >= give_up:
                return value

    def _read(self, seq: int, start: int, stop: int) -> list:
        """ints[start:stop] as the writer of seqlock ``seq`` left them."""
        while True:
            before = self._begin(seq)
            values = self.ints[start:stop].tolist()
            if self.ints[seq] == before or before & 1:
                return values

    def take_slot(self, slot: Optional[int], generation: int) -> None:
        """In a new worker: ``slot`` is this process's (None: more workers
        than slots, and its counts are not shown)."""
        self.slot = slot
        if slot is not None:        # (its counts, and what it listed: none)
            self.write(slot, 'pid', [os.getpid(), generation, int(time.time()),
                                     0] + [0] * len(_COUNTS))

    def write(self, slot: int, field: str, values: list) -> None:
        """In its worker: ``values`` from ``field`` on, under its seqlock."""
        base = self.base(slot)
        start = base + _SLOT[field]
        ints = self.ints
        ints[base] += 1
        ints[start:start + len(values)] = memoryview(
            struct.pack('%dq' % len(values), *values)).cast('q')
        ints[base] += 1

    def free_slot(self, slot: int) -> None:
        """In the master, once the slot's worker is gone: its counts go to
        slot 0, under the board's seqlock."""
        base, zero, width = self.base(slot), self.base(0), self.width
        first = _SLOT['accepted']       # (not busy, open: gone with it)
        counts = self._read(base, base + first, base + width)
        ints = self.ints
        ints[0] += 1
        for offset, value in enumerate(counts):
            ints[zero + first + offset] += value
        ints[base:base + width] = memoryview(bytes(8 * width)).cast('q')
        ints[0] += 1

    def snapshot(self, lists: bool = False) -> Tuple[Dict[str, int],
                                                     List[Dict]]:
        """(totals of every slot, the live slots, with their requests if
        ``lists``), read again while the master folds a slot, as _read()."""
        while True:
            before = self._begin(0)
            totals = dict.fromkeys(_COUNTS, 0)
            workers = []
            for slot in range(self.slots + 1):
                base = self.base(slot)
                if slot and not self.ints[base + _SLOT['pid']]:
                    continue
                values = dict(zip(SLOT_FIELDS, self._read(base, base,
                                                          base + self.width)))
                for name in _COUNTS:
                    totals[name] += values[name]
                if slot:
                    values['requests'], values['more'] = (
                        self._list(slot) if lists else ([], 0))
                    workers.append(values)
            if self.ints[0] == before or before & 1:
                return totals, workers

    def lists_published(self, asked: int) -> bool:
        return all(self.ints[self.base(slot) + _SLOT['listed']] >= asked
                   for slot in range(1, self.slots + 1)
                   if self.ints[self.base(slot) + _SLOT['pid']])

    def publish_list(self, asked: int, lines: List[str], more: int) -> None:
        """This worker's requests in flight: whole lines, then how many
        more there were than SLOT_TEXT holds."""
        if self.slot is None:
            return
        at = self.text_at + self.slot * SLOT_TEXT
        data = '\n'.join(lines + ['+%d' % more]).encode('utf-8', 'replace')
        self.memory[at:at + len(data) + 1] = data + b'\0'
        self.write(self.slot, 'listed', [asked])

    def _list(self, slot: int) -> Tuple[List[List[str]], int]:
        at = self.text_at + slot * SLOT_TEXT
        text = self.memory[at:at + SLOT_TEXT].split(b'\0', 1)[0].decode(
            'utf-8', 'replace').splitlines()
        more = int(text.pop()[1:]) if text and text[-1][:1] == '+' else 0
        return [line.split('\t') for line in text], more


_PLUMBING = (os.path.dirname(gevent.__file__), os.path.dirname(
    greenlet.__file__), os.path.abspath(__file__))
_STDLIB = os.path.dirname(os.__file__)


def waiting_in(glet) -> str:
    """'file:line function' of the application's frame ``glet`` waits in:
    the innermost one outside gevent, greenlet, this file and the stdlib."""
    frame = glet.gr_frame
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_PLUMBING) or name.startswith(_STDLIB)
                and 'site-packages' not in name):
            return '%s:%d %s' % (name, frame.f_lineno, frame.f_code.co_name)
        frame = frame.f_back
    return '-'


def in_flight(server) -> list:
    """The requests whose handlers run in this process."""
    return [request for connection in list(server.connections)
            for request in list(connection.requests.values())
            if request.greenlet is not None and request.started]


class Instruments:
    """A server's status page (and its counts), access log and slow log,
    each if its setting is on.  Counts go into a flat list (a tuple per
    request kept the garbage collector busy), published four times a
    second, in bulk."""

    def __init__(self, server) -> None:
        settings = server.settings
        self.server = server
        self.board = Scoreboard() if settings.status_path else None
        self.access_log = (AccessLog(settings.access_log)
                           if settings.access_log else None)
        self.slow_request = settings.slow_request
        self.slow_logged = weakref.WeakSet()
        self.counts = [0] * len(_COUNTS)
        self.ended: list = []   # (status, seconds, outcome, in, out) each
        self.listed = 0         # the board's lists_asked we last answered
        self.answering = 0      # status pages in flight here: not counted
        self.forked = False     # a worker of a master (post_fork)
        self._timer = None
        events = ['serving', 'stopped']
        if self.access_log is not None:
            events += ['post_request', 'reopen_logs']
        if self.board is not None:
            events += ['post_fork', 'child_exit', 'on_reload',
                       'connection_opened', 'connection_closed',
                       'request_refused', 'post_request']
            server.add_page(settings.status_path, self.status_page)
        for event in dict.fromkeys(events):
            server.watchers.add(event, getattr(self, event))

    def child_exit(self, server, worker) -> None:
        if worker.slot <= self.board.slots:
            self.board.free_slot(worker.slot)
        if worker.exit_cause is not None:
            self.board['restarts_' + worker.exit_cause] += 1

    def on_reload(self, server) -> None:
        self.board['generation'] += 1

    def post_fork(self, server, worker) -> None:
        self.forked = True
        self.board.take_slot(worker.slot if worker.slot <= self.board.slots
                             else None, worker.generation)

    def serving(self, server) -> None:
        if self.board is not None and not self.forked:
            self.board.take_slot(1, 0)      # serving without a master
        every = min(0.25, (self.slow_request or 1.0) / 2)
        self._timer = gevent.get_hub().loop.timer(every, every)
        self._timer.start(self.tick)

    def stopped(self, server) -> None:
        if self._timer is not None:
            self._timer.close()
        if self.board is not None:
            self.flush()        # what the drain served
        if self.access_log is not None:
            self.access_log.close()

    def reopen_logs(self) -> None:
        self.access_log.reopen()

    def connection_opened(self, connection) -> None:
        self.counts[_COUNT['accepted']] += 1
        self.counts[_COUNT['open']] += 1

    def connection_closed(self, connection) -> None:
        self.counts[_COUNT['open']] -= 1

    def request_refused(self, request, why: str) -> None:
        self.counts[_COUNT['shed' if why == 'shed' else 'refused']] += 1

    def post_request(self, worker, request, environ, resp) -> None:
        if self.board is not None:
            self.ended += (request.response_status, request.duration,
                           request.outcome, request.bytes_received,
                           request.response_bytes)
        # (an aborted request was ended by whoever stopped it: not logged)
        if self.access_log is not None and request.outcome != ABORTED:
            self.access_log.log(request, environ)

    def flush(self) -> None:
        """Our counts to the scoreboard, with the requests ended since
        (counted in bulk: fewer instructions than one at a time)."""
        counts, ended, self.ended = self.counts, self.ended, []
        index = _COUNT.__getitem__
        codes, durations, outcomes, read, written = (ended[field::5]
                                                     for field in range(5))
        for code, n in collections.Counter(code // 100 for code in codes
                                           ).items():
            if 1 <= code <= 5:
                counts[index('1xx') + code - 1] += n
        for bucket, n in collections.Counter(map(
                bisect.bisect_left, itertools.repeat(DURATION_BUCKETS),
                durations)).items():
            counts[index('bucket_0') + bucket] += n
        counts[index('aborted')] += outcomes.count(ABORTED)
        counts[index('timed_out')] += outcomes.count(TIMED_OUT)
        counts[index('served')] += len(codes)
        counts[index('duration_us')] += int(sum(durations) * 1e6)
        counts[index('bytes_in')] += sum(read)
        counts[index('bytes_out')] += sum(written)
        counts[index('busy')] = self.server.active_requests - self.answering
        if self.board.slot is not None:
            self.board.write(self.board.slot, 'busy', counts)

    def tick(self) -> None:
        """Four times a second: the slow log (a request past slow_request is
        logged once, with the stack it waits in: PHP-FPM's slowlog); our
        counts, and our requests if a status page asked, to the scoreboard;
        samples of the most requests in flight, and of the listen queue."""
        if self.slow_request:
            self.log_slow_requests()
        if self.access_log is not None:
            self.access_log.flush()
        board = self.board
        if board is None:
            return
        self.flush()
        if board['lists_asked'] != self.listed:
            self.publish_list()
        busy = board.ints[board.base(1) + _SLOT['busy']::board.width]
        queue = (tcp_info(getattr(self.server, 'socket', None), 24) or (0,))[0]
        board['max_busy'] = max(board['max_busy'], sum(busy))
        board['max_listen_queue'] = max(board['max_listen_queue'], queue)

    def log_slow_requests(self) -> None:
        now = time.time()
        for request in in_flight(self.server):
            if (now - request.started <= self.slow_request
                    or request in self.slow_logged):
                continue
            self.slow_logged.add(request)
            if self.board is not None:
                self.counts[_COUNT['slow']] += 1
            logger.warning(
                'slow request: worker %d, %r running for %.1fs, waiting '
                'in:\n%s', os.getpid(), request, now - request.started,
                ''.join(traceback.format_stack(
                    request.greenlet.gr_frame)).rstrip())

    def publish_list(self) -> None:
        """Our requests in flight, oldest first, with what each waits in,
        as many as the scoreboard's text holds: only when asked."""
        asked = self.listed = self.board['lists_asked']
        lines, size = [], 0
        requests = sorted((request for request in in_flight(self.server)
                           if request.greenlet is not greenlet.getcurrent()),
                          key=lambda request: request.started)
        for request in requests:
            environ = request.environ
            line = '\t'.join((environ.get('REQUEST_METHOD', '-'), _log_escape(
                environ.get('REQUEST_URI') or request_path(environ)),
                '%.3f' % request.started, waiting_in(request.greenlet)))
            size += len(line.encode('utf-8', 'replace')) + 1
            if size > SLOT_TEXT - 32:
                break
            lines.append(line)
        self.board.publish_list(asked, lines, len(requests) - len(lines))

    def status_page(self, request: Request) -> None:
        """The status page: text (default), ?json or ?openmetrics; ?full adds
        each worker and its requests (each publishes them when asked)."""
        import json
        query = request.environ.get('QUERY_STRING', '')
        flags = set(query.replace('&', ' ').replace('=', ' ').split())
        board = self.board
        self.answering += 1
        try:
            self.flush()
            if 'full' in flags:
                board['lists_asked'] += 1
                self.publish_list()
                deadline = time.monotonic() + 1.0
                while (not board.lists_published(self.listed)
                       and time.monotonic() < deadline):
                    gevent.sleep(0.02)
            report = status_report(board, getattr(self.server, 'socket',
                                                  None), 'full' in flags)
        finally:
            self.answering -= 1
        if 'openmetrics' in flags:
            kind = 'application/openmetrics-text; version=1.0.0; charset=utf-8'
            body = openmetrics(report)
        else:   # (a field a line: for eyes, and for programs)
            kind, body = 'application/json', json.dumps(report, indent=1)
        request.stdout.write(plain_response('200 OK', body.encode('utf-8'),
                                            kind.encode(),
                                            b'Cache-Control: no-store\r\n'))


#: the report's counts: its name (PHP-FPM's where it has one), the
#: scoreboard's, and the OpenMetrics name and type (None: not a metric)
_REPORTED = (('accepted conn', 'accepted', 'connections', 'counter'),
             ('open connections', 'open', 'open_connections', 'gauge'),
             ('requests in flight', 'busy', 'requests_in_flight', 'gauge'),
             ('requests', 'served', 'requests', 'counter'),
             ('max requests in flight', 'max_busy', None, None),
             ('aborted requests', 'aborted', 'aborted_requests', 'counter'),
             ('refused requests', 'refused', 'refused_requests', 'counter'),
             ('shed requests', 'shed', 'shed_requests', 'counter'),
             ('timed out requests', 'timed_out', 'timed_out_requests',
              'counter'),
             ('slow requests', 'slow', 'slow_requests', 'counter'),
             ('bytes received', 'bytes_in', 'received_bytes', 'counter'),
             ('bytes sent', 'bytes_out', 'sent_bytes', 'counter'),
             ('max listen queue', 'max_listen_queue', 'max_listen_queue',
              'gauge'))


def status_report(board: Scoreboard, sock, full: bool = False) -> Dict:
    """The whole server's counters, all workers together (PHP-FPM's names
    where it has one); ``full`` adds each worker and its requests."""
    totals, workers = board.snapshot(full)
    busy = sum(1 for worker in workers if worker['busy'])
    now = time.time()
    # (waiting to be accepted, backlog) of a TCP listener, as PHP-FPM says
    queue, backlog = tcp_info(sock, 24, 2) or (-1, -1)
    report = {
        'start time': board['started'],
        'start since': int(now) - board['started'],
        'generation': board['generation'],
        'total processes': len(workers), 'active processes': busy,
        'idle processes': len(workers) - busy}
    for key, name, _, _ in _REPORTED:
        report[key] = totals[name] if name in totals else board[name]
    report.update({
        'requests by status': {'%dxx' % n: totals['%dxx' % n]
                               for n in range(1, 6)},
        'request duration seconds': {
            'buckets': dict(zip([str(b) for b in DURATION_BUCKETS]
                                + ['+Inf'], itertools.accumulate(
                                    totals['bucket_%d' % n] for n in range(
                                        len(DURATION_BUCKETS) + 1)))),
            'sum': totals['duration_us'] / 1e6},
        'listen queue': queue, 'listen queue len': backlog,
        'worker restarts': {cause: board['restarts_' + cause] for cause in
                            ('exit', 'signal', 'max_requests',
                             'worker_timeout', 'reload')}})
    if full:
        report['processes'] = [{
            'pid': worker['pid'], 'generation': worker['generation'],
            'start time': worker['started'], 'requests': worker['served'],
            'state': 'Running' if worker['busy'] else 'Idle',
            'requests in flight': [{
                'method': method, 'uri': uri,
                'age': round(now - float(started), 3), 'waiting in': frame}
                for method, uri, started, frame in worker['requests']],
            'more requests in flight': worker['more']} for worker in workers]
    return report


_METRICS = [    # OpenMetrics name and type, and the report's key
    ('start_time_seconds', 'gauge', 'start time'),
    ('processes', 'gauge', 'processes'),
    ('responses', 'counter', 'requests by status'),
    ('listen_queue', 'gauge', 'listen queue'),
    ('worker_restarts', 'counter', 'worker restarts'),
    ('request_duration_seconds', 'histogram', 'request duration seconds')
] + [(name, kind, key) for key, _, name, kind in _REPORTED if name]
_METRIC_LABELS = {'processes': 'state', 'responses': 'class',
                  'worker_restarts': 'cause'}


def openmetrics(report: Dict) -> str:
    """The report in the OpenMetrics text format (Prometheus scrapes it)."""
    report = dict(report, processes={'active': report['active processes'],
                                     'idle': report['idle processes']})
    out = []
    for name, kind, key in _METRICS:
        out.append('# TYPE gevent_fastcgi_%s %s' % (name, kind))
        if kind == 'histogram':
            duration = report[key]
            samples = [('_bucket{le="%s"}' % le, count)
                       for le, count in duration['buckets'].items()] + [
                ('_count', duration['buckets']['+Inf']),
                ('_sum', duration['sum'])]
        elif isinstance(report[key], dict):
            samples = [('%s{%s="%s"}' % ('_total' * (kind == 'counter'),
                                        _METRIC_LABELS[name], label), value)
                       for label, value in report[key].items()]
        else:
            samples = [('_total' * (kind == 'counter'), report[key])]
        out += ['gevent_fastcgi_%s%s %s' % (name, suffix, value)
                for suffix, value in samples]
    return '\n'.join(out) + '\n# EOF\n'


def watch_server(server) -> None:
    """What a new server's settings switch on, watching it."""
    settings = server.settings
    if settings.status_path or settings.access_log or settings.slow_request:
        Instruments(server)


FastCGIServer.watched_by.append(watch_server)


# 14. Running a server: run_server, pid file, PasteDeploy runners -------------

def write_pid_file(path: str) -> None:
    """Write our pid to ``path``, replacing it with a new file (O_EXCL, an
    unpredictable name): never through a planted symlink, nor half-written."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.%s.' % name, dir=folder)
    try:
        with os.fdopen(fd, 'w') as f:
            f.write('%d\n' % os.getpid())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def remove_pid_file(path: str) -> None:
    with suppress(OSError), open(path) as f:
        if f.read().strip() == str(os.getpid()):    # still ours
            os.unlink(path)


def run_server(app, address, handler: str = 'wsgi', debug: bool = False,
               pid_file: Optional[str] = None,
               settings: Optional[Settings] = None) -> int:
    """The command line's, Paste's and Django's way to serve: make the
    server, write the pid file, serve; return the exit status.  ``app`` may
    be an AppLoader, which each worker loads.  StartupError: it could not
    start (and nothing else is raised before it serves)."""
    request_handler = (app if isinstance(app, AppLoader)
                       else make_handler(handler, app, debug))
    become_server_process()
    try:
        server = FastCGIServer(address, request_handler,
                               settings or Settings())
        if pid_file:
            write_pid_file(pid_file)
    except (OSError, ValueError, TypeError) as exc:
        raise StartupError(str(exc)) from exc
    logger.info('gevent_fastcgi %s serving %r on %s', __version__, app,
                ', '.join(describe_address(a) for a in server.addresses))
    from gevent import monkey
    patched = [name for name in ('socket', 'ssl', 'time', 'select',
                                 'threading') if monkey.is_module_patched(name)]
    logger.info('monkey-patched: %s' % ', '.join(patched) if patched else
                'not monkey-patched: a blocking call (a database driver...) '
                'holds up its process (README.rst: --monkey-patch)')
    try:
        return server.serve_forever()
    finally:
        if pid_file:
            remove_pid_file(pid_file)


def _paste_runner(handler_name: str):
    def run(app, global_conf=None, **local_conf):
        where = 'gevent_fastcgi#%s' % handler_name
        settings = dict(local_conf)
        host = settings.pop('host', None)
        port = settings.pop('port', None)
        path = settings.pop('socket', None)
        pid_file = settings.pop('pid_file', None)
        debug = convert_setting(where, 'debug', _to_bool,
                                settings.pop('debug', False))
        patches = [key[len(MONKEY_PREFIX):].replace('patch_', '', 1)
                   for key in [k for k in settings
                               if k.startswith(MONKEY_PREFIX)]
                   if convert_setting(where, key, _to_bool,
                                      settings.pop(key))]
        settings = Settings(settings, where)
        if path and (host or port):
            raise ValueError('%s: give either socket or host and port, not '
                             'both' % where)
        address = path or (host or '127.0.0.1', convert_setting(
            where, 'port', _to_int(0), port or 4000))
        if patches:
            monkey_patch(patches)
        run_server(app, address, handler_name, debug, pid_file, settings)
    run.__name__ = run.__qualname__ = 'run_' + handler_name
    run.__doc__ = ('PasteDeploy server runner: ``use = egg:gevent_fastcgi#%s``'
                   % handler_name)
    return run


run_wsgi = _paste_runner('wsgi')
run_wsgiref = _paste_runner('wsgiref')
run_fastcgi = _paste_runner('fastcgi')


# 15. The built-in FastCGI client and the demo application --------------------

def fastcgi_request(address, uri: str = '/',
                    params: Optional[Dict[str, str]] = None,
                    timeout: float = 10.0):
    """One GET to a FastCGI server (ours or any other), on a blocking socket,
    for health checks: (stdout, stderr, app_status, protocol_status).
    ``params`` add to or replace the CGI variables made from ``uri``."""
    path, _, query = uri.partition('?')
    environ = {
        'GATEWAY_INTERFACE': 'CGI/1.1', 'SERVER_PROTOCOL': 'HTTP/1.1',
        'SERVER_NAME': 'localhost', 'SERVER_PORT': '80',
        'REMOTE_ADDR': '127.0.0.1', 'REQUEST_METHOD': 'GET',
        'REQUEST_URI': uri, 'SCRIPT_NAME': '', 'PATH_INFO': path,
        'QUERY_STRING': query, **(params or {})}
    wire = (encode_begin_request(1) + encode_records(
        FCGI_PARAMS, 1, encode_pairs(environ)) + encode_records(FCGI_PARAMS, 1)
        + encode_records(FCGI_STDIN, 1))
    if isinstance(address, tuple):
        sock = _stdlib_socket.create_connection(address[:2], timeout)
    else:
        sock = _stdlib_socket.socket(_stdlib_socket.AF_UNIX)
        sock.settimeout(timeout)
        sock.connect(address)
    output = {FCGI_STDOUT: [], FCGI_STDERR: []}
    parser = RecordParser()
    try:
        sock.sendall(wire)
        while True:
            data = sock.recv(65536)
            for rtype, rid, content in parser.feed(data):
                if rid == 1 and rtype in output:
                    output[rtype].append(content)
                elif rid == 1 and rtype == FCGI_END_REQUEST:
                    return (b''.join(output[FCGI_STDOUT]), b''.join(
                        output[FCGI_STDERR]), *decode_end_request(content))
            if not data:
                raise ConnectionClosed('the server closed the connection '
                                       'before FCGI_END_REQUEST')
    finally:
        sock.close()


def demo_app(environ, start_response):
    """The built-in demo: a page showing the request as the server got it."""
    body = ('gevent_fastcgi %s works.  This is the built-in demo application; '
            'run your own with: python -m gevent_fastcgi module:app\n\nThe '
            'request as it arrived:\n\n%s' % (__version__, ''.join(
                '%s: %r\n' % (key, environ[key]) for key in sorted(environ)
                if key != 'fastcgi.request'))).encode('utf-8')
    start_response('200 OK', [('Content-Type', 'text/plain; charset=utf-8'),
                              ('Content-Length', str(len(body)))])
    return [b''] if environ['REQUEST_METHOD'] == 'HEAD' else [body]


# 16. Command line ------------------------------------------------------------

LOG_FORMAT = '%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s'


def configure_logging(level: str, error_log: Optional[str] = None) -> None:
    """The server's own log: ``error_log`` (SIGUSR1 reopens it) or stderr,
    unless logging has a handler already (Django's): then ours if asked."""
    root = logging.getLogger()
    logger.setLevel(getattr(logging, level.upper()))
    if error_log or not root.handlers:
        if not root.handlers:
            root.setLevel(logger.level)
        handler = (logging.FileHandler(error_log) if error_log
                   else logging.StreamHandler())
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)


def _checked(convert):
    """A converter raising ValueError -> an argparse type."""
    import argparse

    def parse(text):
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def add_server_arguments(parser) -> None:
    """The options the command line and the Django command share."""
    parser.add_argument('--handler', choices=sorted(HANDLERS),
                        help="wsgi (default), wsgiref (the stdlib's), or "
                             'fastcgi: APP is a request handler')
    for option in SERVER_OPTIONS:
        if option.flag is None:
            continue
        flags = [option.flag]
        if option.name == 'worker_timeout':
            flags.append('--worker-timeout')
        # (text: Settings converts each value once)
        parser.add_argument(*flags, dest=option.name, help=option.help,
                            metavar=option.flag[2:].upper().replace('-', '_'))
    parser.add_argument('--pid', dest='pid_file', metavar='FILE',
                        help='write the server (master) process id to FILE')
    parser.add_argument('--debug', action='store_true', help='tracebacks '
                        'to the client (never in production)')
    parser.add_argument('--log-level', help='logging level (default info)',
                        choices=['debug', 'info', 'warning', 'error'])
    parser.add_argument('--error-log', metavar='FILE', help="the server's own "
                        'log (default: stderr); SIGUSR1 reopens it')
    parser.add_argument('--chdir', metavar='DIR',
                        help='change to DIR before loading APP')
    parser.add_argument('--monkey-patch', metavar='NAMES',
                        help='gevent.monkey patches to apply first: all, or '
                             'socket,ssl... (default: none; see README.rst)')


def prepare(opts: Dict, error) -> None:
    """What the command line and the Django command do before they load
    the application: logging, --monkey-patch, --chdir."""
    try:
        configure_logging(opts['log_level'], opts['error_log'])
    except (OSError, AttributeError) as exc:
        error('--log-level, --error-log: %s' % exc)
    if opts['monkey_patch']:
        try:
            monkey_patch(name.strip() for name in opts['monkey_patch'].split(
                ',') if name.strip())
        except ValueError as exc:
            error('--monkey-patch: %s' % exc)
    if opts['chdir']:
        try:
            os.chdir(opts['chdir'])
        except OSError as exc:
            error('--chdir: %s' % exc)


def server_options(opts) -> Dict:
    """The server settings among parsed arguments (and a --config file)."""
    return {name: opts[name] for name in OPTIONS_BY_NAME
            if opts.get(name) is not None}


def with_config(opts: Dict, parser) -> Dict:
    """Parsed arguments over their --config file's settings over defaults
    (the command line's win, but None and False); 'bind': a list, parsed."""
    given = {name: value for name, value in opts.items()
             if value is not None and value is not False}
    config = read_config(opts['config'], parser) if opts['config'] else {}
    opts = {**opts, 'handler': 'wsgi', 'log_level': 'info', **config, **given}
    binds = opts.get('bind')
    try:
        opts['bind'] = [parse_address(bind) if isinstance(bind, str) else bind
                        for bind in ([binds] if isinstance(binds, (str, tuple))
                                     else binds or ())]
    except ValueError as exc:
        parser.error('bind: %s' % exc)
    return opts


def build_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog='python -m gevent_fastcgi',
        description='Serve a WSGI application over FastCGI (without APP, a '
                    'demo); "request --help": the built-in FastCGI client; %s '
                    'adds arguments before these.' % ENV_ARGS)
    parser.add_argument('app', nargs='?', metavar='APP', help='module:name of '
                        'the WSGI application, module:factory() to call a '
                        'factory; default: the built-in demo')
    parser.add_argument('-b', '--bind', action='append',
                        type=_checked(parse_address), metavar='ADDRESS',
                        help='host:port, [ipv6]:port, unix:/path or fd://N '
                             '(repeat it to listen on several); default: a '
                             'socket inherited from systemd or on fd 0, '
                             'else 127.0.0.1:9000')
    add_server_arguments(parser)
    parser.add_argument('--preload', action='store_true', help='the master '
                        'imports APP (workers share it; HUP reloads nothing)')
    parser.add_argument('-c', '--config', metavar='FILE', help='a Python file '
                        'that sets these by their keywords (README.rst)')
    parser.add_argument('--check-config', action='store_true', help='load '
                        'the settings and APP, then exit: 0, or 1 and why')
    parser.add_argument('--version', action='version',
                        version='gevent_fastcgi %s' % __version__)
    return parser


def client_main(argv) -> int:
    """python -m gevent_fastcgi request ADDRESS [URI]: exit 0 only for 2xx."""
    import argparse
    parser = argparse.ArgumentParser(
        prog='python -m gevent_fastcgi request', description='Send one '
        'request to a FastCGI server, print the response; exit 0 for 2xx.')
    parser.add_argument('address', type=_checked(parse_address),
                        help='host:port, [ipv6]:port or unix:/path')
    parser.add_argument('uri', nargs='?', default='/', help='default /')
    parser.add_argument('-p', '--param', action='append', default=[],
                        metavar='NAME=VALUE', help='set a CGI variable')
    parser.add_argument('-t', '--timeout', type=_checked(_to_float),
                        default=10.0, help='seconds (default 10)')
    parser.add_argument('-q', '--quiet', action='store_true')
    args = parser.parse_intermixed_args(argv)
    params = dict(param.partition('=')[::2] for param in args.param)
    try:
        stdout, stderr, _, protocol_status = fastcgi_request(
            args.address, args.uri, params=params, timeout=args.timeout)
    except (OSError, ProtocolError) as exc:
        stdout, stderr = b'', ('request to %s failed: %s\n' % (
            describe_address(args.address), exc)).encode()
        protocol_status = None
    if protocol_status not in (None, FCGI_REQUEST_COMPLETE):
        stderr = b'refused: FastCGI protocol status %d\n' % protocol_status
    if not args.quiet:
        sys.stdout.buffer.write(stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(stderr)
    try:
        return 0 if protocol_status == FCGI_REQUEST_COMPLETE and 200 <= \
            response_status(stdout) < 300 else 1
    except (ValueError, IndexError):
        return 1


ENV_ARGS = 'GEVENT_FASTCGI_CMD_ARGS'    # gunicorn's GUNICORN_CMD_ARGS


def read_config(path: str, parser) -> Dict:
    """--config FILE (gunicorn's -c): a Python file whose public names are
    settings (their keywords; a module, or a name starting with _, is the
    file's own); the command line wins."""
    import types
    namespace = {'__file__': os.path.abspath(path)}
    try:
        with open(path, 'rb') as file:
            exec(compile(file.read(), path, 'exec'), namespace)
    except Exception as exc:
        parser.error('--config %s: %s: %s' % (path, type(exc).__name__, exc))
    settings = {name: value for name, value in namespace.items() if not (
        name.startswith('_') or isinstance(value, types.ModuleType))}
    unknown = sorted(set(settings) - set(vars(parser.parse_args([])))
                     - set(OPTIONS_BY_NAME) - {'bind'})
    if unknown:
        parser.error('--config %s: %s: no such setting (README.rst lists '
                     'them)' % (path, ', '.join(unknown)))
    return settings


def main(argv=None) -> int:
    import shlex
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['request']:
        return client_main(argv[1:])
    parser = build_parser()
    argv = shlex.split(os.environ.get(ENV_ARGS, '')) + argv
    args = parser.parse_args(argv)
    vars(args).update(with_config(vars(args), parser))
    try:
        settings = Settings(server_options(vars(args)), 'settings')
    except ValueError as exc:
        parser.error(str(exc))
    prepare(vars(args), parser.error)
    if args.chdir or args.app:
        sys.path.insert(0, os.getcwd())
    if args.handler == 'fastcgi' and not args.app:
        parser.error('--handler fastcgi needs APP')
    try:
        if args.app and settings.master and not (args.preload
                                                 or args.check_config):
            # Workers import APP, the master never does: a reload's fresh
            # workers then import fresh code.
            app = AppLoader(args.app, args.handler, args.debug)
        else:
            app = load_app(args.app) if args.app else demo_app
            if args.check_config:
                make_handler(args.handler, app, args.debug)
    except Exception as exc:
        logger.error('cannot load APP %r: %s: %s', args.app,
                     type(exc).__name__, exc)
        return 1
    if args.check_config:
        print('gevent_fastcgi: the settings and the application load')
        return 0
    address = args.bind or take_inherited_listeners() or [('127.0.0.1', 9000)]
    try:
        return run_server(app, address, args.handler, args.debug,
                          args.pid_file, settings)
    except StartupError as exc:
        logger.error('cannot start: %s', exc)
        return 1


# 17. Django management command -----------------------------------------------
#
# INSTALLED_APPS names 'gevent_fastcgi.DjangoAppConfig', made when Django asks
# (module __getattr__).  Django finds commands as files: its ready() puts the
# command's module in sys.modules instead, and enters it in the cache of
# django.core.management.get_commands(), which Django reads after setup().

DJANGO_COMMAND = 'run_gevent_fastcgi'


def install_django_command() -> None:
    """Let Django find 'manage.py run_gevent_fastcgi'; idempotent."""
    import types
    from django.core.management import get_commands
    command = types.ModuleType('%s.management.commands.%s'
                               % (__name__, DJANGO_COMMAND))
    command.Command = _django_command_class()
    for name in ('management', 'management.commands'):
        sys.modules.setdefault('%s.%s' % (__name__, name),
                               types.ModuleType('%s.%s' % (__name__, name)))
    sys.modules.setdefault(command.__name__, command)
    get_commands()[DJANGO_COMMAND] = __name__


def _django_command_class():
    from django.core.management.base import BaseCommand

    class Command(BaseCommand):
        help = ('Serve this project over FastCGI with gevent_fastcgi (listen '
                'on ADDRESS: host:port, [ipv6]:port or unix:/path).')

        # Run by handle(), once script_name is the script prefix: checks
        # that ran before would cache STATIC_URL without it.
        requires_system_checks = []

        def add_arguments(self, parser):
            parser.add_argument('address', nargs='*', type=_checked(
                parse_address), help='where to listen (default 127.0.0.1:9000)')
            parser.add_argument('--skip-checks', action='store_true',
                                help="skip Django's system checks")
            parser.add_argument('-c', '--config', metavar='FILE', help='a '
                                'Python file that sets these (and bind)')
            add_server_arguments(parser)

        def handle(self, *args, **opts):
            from django.core.management.base import CommandError
            from django.core.servers.basehttp import \
                get_internal_wsgi_application
            from django.db import connections
            from django.urls import set_script_prefix

            def error(message):
                raise CommandError(message, returncode=2)
            opts = with_config(opts, self.create_parser('manage.py',
                                                        DJANGO_COMMAND))
            addresses = (opts['address'] or opts['bind']
                         or [('127.0.0.1', 9000)])
            try:
                settings = Settings(server_options(opts), 'settings')
            except ValueError as exc:
                error(str(exc))
            prepare(opts, error)
            for alias in connections:
                # made in django.setup(), for the thread's ident, which
                # --monkey-patch has since changed: Django would refuse to
                # use or close them (made again when first used)
                with suppress(AttributeError):
                    del connections[alias]
            if settings.script_name:
                set_script_prefix(settings.script_name + '/')
            if not opts['skip_checks']:
                self.check()
            try:
                sys.exit(run_server(get_internal_wsgi_application(), addresses,
                                    opts['handler'], opts['debug'],
                                    opts['pid_file'], settings))
            except StartupError as exc:
                raise CommandError('cannot start: %s' % exc)

    return Command


def _django_app_config_class():
    from django.apps import AppConfig

    class DjangoAppConfig(AppConfig):
        name = __name__
        label = 'gevent_fastcgi'
        verbose_name = 'gevent_fastcgi FastCGI server'
        path = os.path.dirname(os.path.abspath(__file__))

        def ready(self):
            install_django_command()

    return DjangoAppConfig


# 18. Optional zope.interface declarations ------------------------------------
#
# IRequest and IRequestHandler are made on first access (module __getattr__):
# zope.interface is imported only by those who use it.


_interfaces = {}


def _declare_interfaces() -> Dict:
    if _interfaces:
        return _interfaces
    from zope.interface import Attribute, Interface, classImplements

    class IRequest(Interface):
        """One FastCGI request as a request handler receives it."""
        id = Attribute('request id (int)')
        role = Attribute('FCGI_RESPONDER, FCGI_AUTHORIZER or FCGI_FILTER')
        keep_conn = Attribute('FCGI_KEEP_CONN flag of the request (bool)')
        environ = Attribute('dict of the FCGI_PARAMS the web server sent')
        stdin = Attribute('file-like request body (FCGI_STDIN)')
        data = Attribute('file-like FCGI_DATA stream (FILTER role)')
        stdout = Attribute('file-like output for the CGI response')
        stderr = Attribute('file-like output to the web server error log')

    class IRequestHandler(Interface):
        """A callable that serves a request."""

        def __call__(request):
            """Serve ``request`` (an IRequest); may return an int, the
            END_REQUEST appStatus."""

    classImplements(Request, IRequest)
    classImplements(WSGIRequestHandler, IRequestHandler)
    classImplements(WSGIRefRequestHandler, IRequestHandler)
    _interfaces.update(IRequest=IRequest, IRequestHandler=IRequestHandler)
    return _interfaces


# 19. Compatibility with the original project ---------------------------------

def install_original_import_paths() -> None:
    """After this one call (never on import: a vendored file must not change
    its host's sys.modules), the original project's module paths work:
    ``gevent_fastcgi.server``, ``.wsgi``, ``.const``, ``.base`` (this
    module), ``.interfaces`` (IRequest, IRequestHandler), and Django's
    ``.adapters.django``."""
    import types
    module = sys.modules.get(__name__)
    if module is None:
        return
    for name in ('server', 'wsgi', 'const', 'base'):
        sys.modules.setdefault('%s.%s' % (__name__, name), module)
    interfaces = types.ModuleType(__name__ + '.interfaces',
                                  'IRequest and IRequestHandler (zope)')
    interfaces.__getattr__ = __getattr__        # made when asked for
    sys.modules.setdefault(interfaces.__name__, interfaces)
    # INSTALLED_APPS' 'gevent_fastcgi.adapters.django': not a module, so
    # Django takes it as the name of an AppConfig class, made when asked for
    adapters = types.ModuleType(__name__ + '.adapters')
    adapters.__getattr__ = lambda name: __getattr__(
        'DjangoAppConfig' if name == 'django' else 'adapters.' + name)
    sys.modules.setdefault(adapters.__name__, adapters)


def __getattr__(name: str):
    """PEP 562: what is made only when asked for (zope.interface and
    Django are imported then, not before)."""
    if name in ('IRequest', 'IRequestHandler'):
        return _declare_interfaces()[name]
    if name == 'DjangoAppConfig':
        return _django_app_config_class()
    raise AttributeError('module %r has no attribute %r' % (__name__, name))


if __name__ == '__main__':
    # "python -m gevent_fastcgi" runs this file as __main__; hand over to the
    # module proper so that there is one copy of every class (bottle does the
    # same).
    import gevent_fastcgi
    sys.exit(gevent_fastcgi.main())
