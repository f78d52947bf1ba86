"""`CKKSBackend` on Microsoft SEAL 4.1 through `tenseal.sealapi` (not TenSEAL's vectors).

SEAL's Python binding serialises only through files, so objects go through a per-thread
anonymous in-memory file (`memfd_create`, reached as /proc/self/fd/N): nothing reaches a disk or
a directory another process could list, and no file is created or unlinked per object (that cost
a quarter of a small model's request). Where memfd is missing, a private 0600 temporary file in
/dev/shm is used instead. Untrusted bytes are
checked before SEAL sees them (SEAL header magic/version/size, size bounds computed from the
parameters) and loaded inside try/except; after loading, the parms_id, size and scale must be
exactly what the plan expects. SEAL can abort the process on some malformed input, so nothing
unchecked is handed to it.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tenseal.sealapi as seal

from veil.he.errors import HEError, InsecureParametersError
from veil.he.params import CKKSParams, check_secure

_SHM = "/dev/shm"  # noqa: S108 (mkstemp fallback: unique 0600 files, RAM-backed so nothing hits a disk)
_TMP_DIR = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None
_SEAL_MAGIC = 0xA15E
_HEADER = struct.Struct("<HBBBBHQ")
_local = threading.local()


def _memfd() -> int | None:
    """This thread's anonymous in-memory file (None where memfd or /proc/self/fd is unavailable)."""
    fd = getattr(_local, "fd", None)
    if fd is not None and _local.pid != os.getpid():  # a forked child must not share the parent's file
        fd = None
    if fd is None and not getattr(_local, "no_memfd", False):
        try:
            fd = os.memfd_create("veil-he", os.MFD_CLOEXEC)
            if not os.path.exists(f"/proc/self/fd/{fd}"):
                os.close(fd)
                raise OSError("no /proc/self/fd")
            _local.fd, _local.pid = fd, os.getpid()
        except (AttributeError, OSError):
            _local.no_memfd, fd = True, None
    return fd


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    while len(data) < size:  # pread may return short on very large objects
        data += os.pread(fd, size - len(data), len(data))
    return data


def _save(obj: Any, wipe: bool = False) -> bytes:
    """`obj.save` into memory. `wipe` (secret keys) truncates the file afterwards."""
    fd = _memfd()
    if fd is None:
        return _save_tmp(obj)
    os.ftruncate(fd, 0)
    obj.save(f"/proc/self/fd/{fd}")
    data = _read_all(fd)
    if wipe:
        os.ftruncate(fd, 0)
    return data


def _load(data: bytes | memoryview, loader: Callable[[str], None]) -> None:
    fd = _memfd()
    if fd is None:
        _load_tmp(data, loader)
        return
    os.ftruncate(fd, 0)
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], done)
    try:
        loader(f"/proc/self/fd/{fd}")
    finally:
        os.ftruncate(fd, 0)


def _save_tmp(obj: Any) -> bytes:
    fd, path = tempfile.mkstemp(prefix="veil-he-", dir=_TMP_DIR)
    os.close(fd)
    try:
        obj.save(path)
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


def _load_tmp(data: bytes | memoryview, loader: Callable[[str], None]) -> None:
    fd, path = tempfile.mkstemp(prefix="veil-he-", dir=_TMP_DIR)
    try:
        os.write(fd, data)
        os.close(fd)
        loader(path)
    finally:
        os.unlink(path)


def check_header(data: bytes | memoryview, what: str, max_size: int) -> None:
    """Validate a SEAL serialization header before SEAL parses anything else."""
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) < _HEADER.size:
        raise HEError(f"bad_{what}", f"{what} is truncated ({len(data)} bytes)")
    magic, header_size, major, _minor, compr, reserved, size = _HEADER.unpack_from(data)
    if magic != _SEAL_MAGIC or header_size != _HEADER.size or major != 4 or reserved != 0:
        raise HEError(f"bad_{what}", f"{what} is not a SEAL 4 object")
    if compr not in (0, 1, 2):
        raise HEError(f"bad_{what}", f"{what} has an unknown compression mode {compr}")
    if size != len(data):
        raise HEError(f"bad_{what}", f"{what} declares {size} bytes but has {len(data)} (truncated?)")
    if size > max_size:
        raise HEError(f"bad_{what}", f"{what} is {size} bytes, larger than {max_size} for these parameters")


def make_context(params: CKKSParams) -> Any:
    """A SEALContext for `params`, refused unless SEAL confirms 128-bit security."""
    check_secure(params.poly_modulus_degree, params.coeff_bits)
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(params.poly_modulus_degree)
    try:
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_bits)))
    except (ValueError, RuntimeError) as exc:
        raise InsecureParametersError(f"SEAL refused the modulus chain: {exc}") from None
    context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    if not context.parameters_set():
        raise InsecureParametersError(
            f"SEAL refused the parameters at 128-bit security: {context.parameters_error_message()}"
        )
    return context


@dataclass
class EvalKeys:
    """Server-side evaluation keys (never the secret key) and the Galois elements they cover.

    `galois` maps each Galois element to the SEAL GaloisKeys object holding it (clients make one
    object per element, see `SealSecretKey.eval_keys`; an older client's single object serves
    every element it has).
    """

    relin: Any | None
    galois: dict[int, Any] | None
    elements: frozenset[int] = field(default_factory=frozenset)
    nbytes: int = 0


class _Context:
    """A SEAL context with its encoder and evaluator: read-only once built (SEAL's evaluator and
    encoder are const), so every backend for one parameter set in a process can share it."""

    __slots__ = ("context", "encoder", "evaluator", "__weakref__")

    def __init__(self, params: CKKSParams) -> None:
        self.context = make_context(params)
        self.encoder = seal.CKKSEncoder(self.context)
        self.evaluator = seal.Evaluator(self.context)


_contexts: weakref.WeakValueDictionary[tuple, _Context] = weakref.WeakValueDictionary()
_contexts_lock = threading.Lock()


def _shared_context(params: CKKSParams) -> _Context:
    """The process's context for `params`' ring and primes, made on first use.

    A context holds NTT tables for every prime at every level (~10 MB at N=8192, five primes):
    a client and a server in one process (the in-process transport, tests, benchmarks) or two
    models with equal parameters would each pay that for identical read-only tables. It lives
    as long as some backend uses it.
    """
    check_secure(params.poly_modulus_degree, params.coeff_bits)
    key = (params.poly_modulus_degree, tuple(params.coeff_bits))
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = _Context(params)
            _contexts[key] = ctx
        return ctx


class SealBackend:
    """SEAL CKKS context for one parameter set; thread-safe (SEAL's evaluator is const)."""

    def __init__(self, params: CKKSParams) -> None:
        self.params = params
        self._shared = _shared_context(params)
        self.context = self._shared.context
        self.encoder = self._shared.encoder
        self.evaluator = self._shared.evaluator
        self.slot_count = self.encoder.slot_count()
        self._chain: list[Any] = []
        data = self.context.first_context_data()
        while data is not None:
            self._chain.append(data)
            data = data.next_context_data()
        self.levels = len(self._chain)
        self._parms_ids = [d.parms_id() for d in self._chain]
        self._primes = [[m.value() for m in d.parms().coeff_modulus()] for d in self._chain]
        self.n = params.poly_modulus_degree

    # --- encoding -----------------------------------------------------------------------------
    def encode(self, values: np.ndarray | float, scale: float, level: int) -> Any:
        plain = seal.Plaintext()
        if isinstance(values, float | int | np.floating):
            self.encoder.encode(float(values), self._parms_ids[level], float(scale), plain)
        elif isinstance(values, complex | np.complexfloating):
            self.encoder.encode(complex(values), self._parms_ids[level], float(scale), plain)
        else:
            vec = np.asarray(values)
            vec = vec.astype(np.complex128 if np.iscomplexobj(vec) else np.float64).reshape(-1)
            if vec.size > self.slot_count:
                raise HEError("bad_request", f"{vec.size} values do not fit {self.slot_count} slots")
            self.encoder.encode(vec.tolist(), self._parms_ids[level], float(scale), plain)
        return plain

    def decode(self, plain: Any, complex_slots: bool = False) -> np.ndarray:
        if complex_slots:
            return np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)
        return np.asarray(self.encoder.decode_double(plain), dtype=np.float64)

    def prime(self, level: int) -> int:
        return int(self._primes[level][-1])

    def primes(self, level: int = 0) -> list[int]:
        return list(self._primes[level])

    # --- arithmetic -----------------------------------------------------------------------------
    def add(self, a: Any, b: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.add(a, b, out)
        return out

    def add_inplace(self, a: Any, b: Any) -> None:
        self.evaluator.add_inplace(a, b)

    def add_plain_inplace(self, a: Any, p: Any) -> None:
        self.evaluator.add_plain_inplace(a, p)

    def multiply_plain(self, a: Any, p: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.multiply_plain(a, p, out)
        return out

    def sub(self, a: Any, b: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.sub(a, b, out)
        return out

    def negate_inplace(self, a: Any) -> None:
        self.evaluator.negate_inplace(a)

    def conjugate(self, a: Any, galois_keys: dict[int, Any]) -> Any:
        """Complex conjugate of every slot (Galois element 2N - 1)."""
        out = seal.Ciphertext()
        self.evaluator.complex_conjugate(a, galois_keys[2 * self.n - 1], out)
        return out

    def multiply(self, a: Any, b: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.multiply(a, b, out)
        return out

    def square(self, a: Any) -> Any:
        out = seal.Ciphertext()
        self.evaluator.square(a, out)
        return out

    def relinearize_inplace(self, a: Any, relin_keys: Any) -> None:
        self.evaluator.relinearize_inplace(a, relin_keys)

    def rescale_inplace(self, a: Any) -> None:
        self.evaluator.rescale_to_next_inplace(a)

    def galois_element(self, step: int) -> int:
        return pow(3, step % self.slot_count, 2 * self.n)

    def rotate(self, a: Any, step: int, galois_keys: dict[int, Any]) -> Any:
        out = seal.Ciphertext()
        element = self.galois_element(step)
        self.evaluator.apply_galois(a, element, galois_keys[element], out)
        return out

    def scale(self, a: Any) -> float:
        return float(a.scale)

    def size(self, a: Any) -> int:
        """Number of polynomials (2 normally, 3 after an unrelinearized product)."""
        return int(a.size())

    def level(self, a: Any) -> int:
        return self._parms_ids.index(a.parms_id())

    # --- serialization --------------------------------------------------------------------------
    def serialize(self, obj: Any) -> bytes:
        return _save(obj)

    def ciphertext_bound(self, level: int) -> int:
        """Largest honest serialized size of a 2-component ciphertext at `level`."""
        return 2 * self.n * len(self._primes[level]) * 8 + 4096

    def load_ciphertext(self, data: bytes, level: int, scale: float) -> Any:
        check_header(data, "ciphertext", self.ciphertext_bound(level))
        ct = seal.Ciphertext()
        try:
            _load(data, lambda path: ct.load(self.context, path))
        except (RuntimeError, ValueError, MemoryError, TypeError) as exc:
            raise HEError("bad_ciphertext", f"ciphertext does not load for these parameters ({exc})") from None
        if ct.parms_id() != self._parms_ids[level]:
            raise HEError("wrong_parameters", "ciphertext was made for other parameters or level")
        if ct.size() != 2 or not ct.is_ntt_form():
            raise HEError("bad_ciphertext", "ciphertext must be a fresh 2-component CKKS ciphertext")
        if not abs(ct.scale / scale - 1.0) < 1e-9:
            raise HEError("bad_ciphertext", f"ciphertext scale 2^{np.log2(ct.scale):.2f} is not 2^{np.log2(scale):.2f}")
        return ct

    def key_bound(self, count: int) -> int:
        """Largest honest serialized size of `count` key-switching keys."""
        k = len(self._primes[0])
        return count * k * 2 * self.n * (k + 1) * 8 + 4096 * (count + 1)

    def load_eval_keys(
        self, relin: bytes | memoryview | None, galois: bytes | memoryview | None, elements: list[int]
    ) -> EvalKeys:
        """Evaluation keys from an uploaded blob's relin and Galois parts (see `read_eval_keys`)."""
        chain = _ViewChain([memoryview(part) for part in (relin, galois) if part is not None])
        return self.read_eval_keys(chain.read, len(relin or b""), len(galois or b""), elements)

    def read_eval_keys(
        self, read: Callable[[int], bytes | memoryview], relin_len: int, galois_len: int, elements: list[int]
    ) -> EvalKeys:
        """Evaluation keys read from `read(n)` (exactly n bytes or HEError): `relin_len` bytes of
        relinearization keys, then `galois_len` bytes of serialized GaloisKeys objects, loaded
        one at a time as they are read, so a caller streaming them from the store never holds
        the serialized keys (tens of MiB) beside the loaded ones. Every part's SEAL header is
        checked before SEAL parses it; keys for other parameters are refused."""
        key_parms = self.context.key_parms_id()
        relin_keys = galois_keys = None
        try:
            if relin_len:
                relin = read(relin_len)
                check_header(relin, "keys", self.key_bound(1))
                relin_keys = seal.RelinKeys()
                _load(relin, lambda p: relin_keys.load(self.context, p))
                if relin_keys.parms_id() != key_parms or not seal.is_valid_for(relin_keys, self.context):
                    raise HEError("wrong_parameters", "relinearization keys are for other parameters")
            if galois_len:
                galois_keys = self._read_galois(read, galois_len, elements, key_parms)
        except (RuntimeError, ValueError, MemoryError, TypeError) as exc:
            raise HEError("bad_keys", f"evaluation keys do not load for these parameters ({exc})") from None
        return EvalKeys(relin_keys, galois_keys, frozenset(elements), relin_len + galois_len)

    def _read_galois(
        self, read: Callable[[int], bytes | memoryview], left: int, elements: list[int], key_parms: Any
    ) -> dict[int, Any]:
        bound, most = self.key_bound(max(1, len(elements))), max(1, len(elements))
        galois_keys: dict[int, Any] = {}
        count = 0
        while left > 0:
            if left < _HEADER.size:
                raise HEError("bad_keys", f"keys is truncated ({left} trailing bytes)")
            head = bytes(read(_HEADER.size))
            size = _HEADER.unpack_from(head)[-1]
            if size < _HEADER.size or size > left:
                raise HEError("bad_keys", f"keys declares {size} bytes past the end of the blob (truncated?)")
            if size > bound:  # before reading it: a declared size is not yet a reason to read
                raise HEError("bad_keys", f"keys is {size} bytes, larger than {bound} for these parameters")
            count += 1
            if count > most:
                raise HEError("bad_keys", f"more Galois key objects than the {len(elements)} elements")
            part = head + bytes(read(size - _HEADER.size))  # one key's worth
            check_header(part, "keys", bound)
            obj = seal.GaloisKeys()
            _load(part, lambda p, obj=obj: obj.load(self.context, p))
            del part
            if obj.parms_id() != key_parms or not seal.is_valid_for(obj, self.context):
                raise HEError("wrong_parameters", "Galois keys are for other parameters")
            for e in elements:
                if e not in galois_keys and obj.has_key(e):
                    galois_keys[e] = obj
            left -= size
        missing = [e for e in elements if e not in galois_keys]
        if missing:
            raise HEError("bad_keys", f"Galois keys lack elements {missing}")
        return galois_keys


class _ViewChain:
    """`read(n)` over pieces of memory one after another (views, no copies within a piece)."""

    def __init__(self, pieces: list[memoryview]) -> None:
        self._pieces, self._at = [p for p in pieces if len(p)], 0

    def read(self, n: int) -> bytes | memoryview:
        out: list[memoryview] = []
        while n > 0 and self._pieces:
            piece = self._pieces[0]
            take = piece[self._at : self._at + n]
            out.append(take)
            n -= len(take)
            self._at += len(take)
            if self._at >= len(piece):
                self._pieces.pop(0)
                self._at = 0
        if n > 0:
            raise HEError("bad_keys", "evaluation keys are truncated")
        return out[0] if len(out) == 1 else b"".join(out)


class SealSecretKey:
    """The client's CKKS secret key: encrypts (seeded, symmetric) and decrypts. Never printed."""

    _lock = threading.Lock()

    def __init__(self, backend: SealBackend, secret: Any | None = None) -> None:
        self._backend = backend
        if secret is None:
            self._keygen = seal.KeyGenerator(backend.context)
            secret = self._keygen.secret_key()
        else:
            self._keygen = seal.KeyGenerator(backend.context, secret)
        self._secret = secret
        self._encryptor = seal.Encryptor(backend.context, secret)
        self._decryptor = seal.Decryptor(backend.context, secret)

    def __repr__(self) -> str:
        return "SealSecretKey(<secret>)"

    @classmethod
    def load(cls, backend: SealBackend, data: bytes) -> SealSecretKey:
        check_header(data, "secret_key", backend.key_bound(1))
        secret = seal.SecretKey()
        try:
            _load(data, lambda p: secret.load(backend.context, p))
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise HEError("bad_keys", f"secret key does not load for these parameters ({exc})") from None
        return cls(backend, secret)

    def export(self) -> bytes:
        """The secret key's bytes, for the client's own key file only."""
        return _save(self._secret, wipe=True)

    def eval_keys(self, galois_elements: list[int], relin: bool) -> tuple[bytes | None, list[bytes]]:
        """Seeded (half-size) relinearization keys, and Galois keys for the given Galois elements
        as one serialized GaloisKeys object per element (to be stored back to back).

        One object per element: SEAL's memory pool keeps whatever it once allocated, so making
        all keys in one object left a full uncompressed copy of them (34 MiB for the digits MLP)
        in the client's memory for good; one at a time it is one key's worth. The parts are not
        joined here, so a caller writing them to a file never holds a second copy. The server
        loads them the same way (`load_eval_keys`).
        """
        relin_bytes = _save(self._keygen.create_relin_keys()) if relin else None
        parts = [_save(self._keygen.create_galois_keys([int(e)])) for e in sorted(galois_elements)]
        return relin_bytes, parts

    def encrypt(self, values: np.ndarray, scale: float, level: int = 0) -> bytes:
        """Seeded symmetric encryption at `level`: the second polynomial travels as a 64-byte seed."""
        plain = self._backend.encode(values, scale, level)
        return _save(self._encryptor.encrypt_symmetric(plain))

    def decrypt(self, data: bytes, level: int | None = None, complex_slots: bool = False) -> np.ndarray:
        """Decrypt a server result; checks it belongs to this key's parameters first."""
        backend = self._backend
        check_header(data, "ciphertext", backend.ciphertext_bound(0))
        ct = seal.Ciphertext()
        try:
            _load(data, lambda p: ct.load(backend.context, p))
        except (RuntimeError, ValueError, MemoryError) as exc:
            raise HEError("bad_ciphertext", f"result does not load ({exc})") from None
        if level is not None and backend.level(ct) != level:
            raise HEError("bad_ciphertext", "result is at an unexpected level")
        if ct.size() != 2:
            raise HEError("bad_ciphertext", "result must be a 2-component ciphertext")
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return backend.decode(plain, complex_slots)
