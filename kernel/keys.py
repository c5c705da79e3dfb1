"""The kernel's long-term Ed25519 key: where it lives, how it is created, how it is named.

Layout (``kernel_home()`` is ``$KERNEL_HOME`` or ``~/.agent-kernel``)::

    <home>/keys/            mode 0700
    <home>/keys/kernel.key  PKCS#8 PEM private key, mode 0600, created once, never overwritten
    <home>/keys/kernel.pub  SubjectPublicKeyInfo PEM public key (give this to auditors)

A key id is ``"ed25519:" + first 16 hex digits of sha256(raw 32-byte public key)``. Key ids are
names for humans and messages only: every trust decision compares full public keys.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kernel.errors import BadInputError, NotFoundError

KEY_FILE = "kernel.key"
PUB_FILE = "kernel.pub"

# The exact DER an Ed25519 key has in PKCS#8 (private) and SubjectPublicKeyInfo (public) form,
# up to the raw 32 key bytes. Keys in exactly this form are read and written here without
# importing cryptography's serialization package (about 8 ms of every `kernel exec`); anything
# else goes through it.
_PKCS8_ED25519 = bytes.fromhex("302e020100300506032b657004220420")
_SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")


def _pem(label: str, der: bytes) -> bytes:
    b64 = base64.b64encode(der)
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {label}-----\n".encode() + b"\n".join(lines)
            + f"\n-----END {label}-----\n".encode())


def _fast_private(data: bytes) -> Ed25519PrivateKey | None:
    """The key if ``data`` is exactly the PKCS#8 PEM this module writes, else None."""
    head, tail = b"-----BEGIN PRIVATE KEY-----\n", b"\n-----END PRIVATE KEY-----\n"
    if not (data.startswith(head) and data.endswith(tail)):
        return None
    try:
        der = base64.b64decode(data[len(head):-len(tail)], validate=True)
    except ValueError:
        return None
    if len(der) != 48 or not der.startswith(_PKCS8_ED25519):
        return None
    return Ed25519PrivateKey.from_private_bytes(der[16:])


def kernel_home() -> Path:
    """``$KERNEL_HOME`` if set (and not empty), else ``~/.agent-kernel``."""
    env = os.environ.get("KERNEL_HOME")
    if env:
        return Path(env)
    return Path.home() / ".agent-kernel"


def raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes_raw()


def keyid_of(pub: Ed25519PublicKey) -> str:
    """``ed25519:<first 16 hex of sha256(raw public key)>``."""
    return "ed25519:" + hashlib.sha256(raw_public(pub)).hexdigest()[:16]


class KernelKey:
    """The kernel's signing key. The private half never leaves this object."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public: Ed25519PublicKey = private.public_key()
        self.public_bytes: bytes = raw_public(self.public)
        self.keyid: str = keyid_of(self.public)

    @classmethod
    def generate(cls) -> KernelKey:
        """A fresh key held only in memory (tests, throw-away runs)."""
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def public_pem(self) -> bytes:
        return _pem("PUBLIC KEY", _SPKI_ED25519 + self.public_bytes)

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._private.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())

    def __repr__(self) -> str:
        return f"KernelKey({self.keyid})"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Publish ``data`` at ``path`` atomically unless ``path`` exists. True if this call created it.

    The bytes go to a unique temporary name, are fsynced, then hard-linked to the final name:
    ``link`` fails if the name exists, so a concurrent creator never clobbers the first one and no
    reader ever sees a partial file.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path, follow_symlinks=False)
        created = True
    except FileExistsError:
        created = False
    finally:
        os.unlink(tmp)
    _fsync_dir(path.parent)
    return created


def _load_private(path: Path) -> KernelKey:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"kernel key {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInputError(f"kernel key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise BadInputError(f"kernel key {path} is readable by others "
                            f"(mode {st.st_mode & 0o777:o})", hint=f"chmod 600 {path}")
    data = path.read_bytes()
    fast = _fast_private(data)
    if fast is not None:
        return KernelKey(fast)
    from cryptography.hazmat.primitives import serialization

    try:
        priv = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadInputError(f"kernel key {path} is not a readable PEM private key: {e}") from None
    if not isinstance(priv, Ed25519PrivateKey):
        raise BadInputError(f"kernel key {path} is not an Ed25519 key")
    return KernelKey(priv)


def load_or_create_kernel_key(home: Path | None = None) -> KernelKey:
    """Load ``<home>/keys/kernel.key``, creating it (and ``kernel.pub``) on first use.

    Creation is atomic and race-free: two processes creating at once end up with the same key
    (the loser of the race loads the winner's). The key directory is mode 0700, the key 0600.
    """
    home = kernel_home() if home is None else home
    kdir = home / "keys"
    kdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(kdir)
    if not stat.S_ISDIR(st.st_mode):
        raise BadInputError(f"key directory {kdir} is not a directory")
    if st.st_mode & 0o077:
        os.chmod(kdir, 0o700)
    kpath = kdir / KEY_FILE
    if not os.path.lexists(kpath):
        fresh = KernelKey.generate()
        _write_new(kpath, fresh.private_pem(), 0o600)
    key = _load_private(kpath)
    ppath = kdir / PUB_FILE
    pem = key.public_pem()
    try:
        current = ppath.read_bytes()
    except FileNotFoundError:
        current = b""
    if current != pem:
        # Derived from the private key, so rewriting it is always safe: tmp + rename.
        tmp = ppath.with_name(f".{PUB_FILE}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, ppath)
        _fsync_dir(kdir)
    return key


def parse_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    """A PEM (SubjectPublicKeyInfo) public key, or 64 hex digits of a raw key."""
    text = data.strip()
    if len(text) == 64:
        try:
            return Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.decode("ascii")))
        except (ValueError, UnicodeDecodeError):
            pass
    from cryptography.hazmat.primitives import serialization

    try:
        pub = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadInputError(f"{where}: not a PEM public key or 64 hex digits: {e}") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise BadInputError(f"{where}: not an Ed25519 public key")
    return pub


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load an auditor-supplied public key file (PEM, or 64 hex digits of the raw key)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"public key file {path} does not exist") from None
    except IsADirectoryError:
        raise BadInputError(f"public key file {path} is a directory") from None
    except OSError as e:
        raise BadInputError(f"public key file {path} cannot be read: {e.strerror}") from None
    return parse_public_key(data, str(path))
