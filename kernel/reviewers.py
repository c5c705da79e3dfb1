"""Reviewer keys and keyrings.

A reviewer's key pair lives in the *reviewer's own* kernel home, never in the kernel's run::

    $KERNEL_HOME/reviewers/            mode 0700
    $KERNEL_HOME/reviewers/NAME.key    PKCS#8 PEM Ed25519 private key, mode 0600
    $KERNEL_HOME/reviewers/NAME.pub    raw public key, 64 lowercase hex digits and a newline

The kernel process (``kernel exec``) never opens a ``.key`` file: it reads only the public halves
(the policy's reviewers, the keyring, and the operator's own ``.pub`` files, to recognise
self-approval). Signing happens in ``kernel approve`` / ``kernel deny``, run by the reviewer.

A keyring is TOML::

    [[reviewers]]
    name = "alice"
    public_key = "<64 hex>"

``kernel keys export NAME`` prints such an entry.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kernel.errors import BadKeyError, NotFoundError, UsageError
from kernel.keys import keyid_of, raw_public
from kernel.policy import HEX_KEY_RE, RULE_ID_RE, Reviewer

REVIEWERS_DIR = "reviewers"
NAME_RE = RULE_ID_RE


def reviewers_dir(home: Path) -> Path:
    return home / REVIEWERS_DIR


class ReviewerKey:
    """A reviewer's private key, held only by the reviewer's own ``kernel approve`` process."""

    def __init__(self, name: str, private: Ed25519PrivateKey, path: Path) -> None:
        self.name = name
        self._private = private
        self.path = path
        self.public_hex = raw_public(private.public_key()).hex()
        self.keyid = keyid_of(private.public_key())

    def sign(self, message: bytes) -> str:
        return self._private.sign(message).hex()


def new_key(home: Path, name: str) -> ReviewerKey:
    """Create ``NAME.key`` (0600) and ``NAME.pub``; refuses to overwrite an existing key."""
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"reviewer name {name!r}: use lowercase letters, digits and ._- "
                         "(at most 64, starting with a letter or digit)")
    d = reviewers_dir(home)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    kpath = d / f"{name}.key"
    from cryptography.hazmat.primitives import serialization  # not on the exec path (~8 ms)

    priv = Ed25519PrivateKey.generate()
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    try:
        fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except FileExistsError:
        raise BadKeyError(f"reviewer key {kpath} already exists; not overwritten",
                          hint="choose another name, or remove the old key yourself") from None
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    pub = raw_public(priv.public_key()).hex()
    (d / f"{name}.pub").write_text(pub + "\n")
    os.chmod(d / f"{name}.pub", 0o644)
    return ReviewerKey(name, priv, kpath)


def load_key(path: Path) -> ReviewerKey:
    """Load a reviewer private key file; refuses one readable by others."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFoundError(f"reviewer key {path} does not exist",
                            hint="create one with `kernel keys new --reviewer NAME`") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadKeyError(f"reviewer key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise BadKeyError(f"reviewer key {path} is readable by others (mode "
                          f"{st.st_mode & 0o777:o})", hint=f"chmod 600 {path}")
    from cryptography.hazmat.primitives import serialization  # not on the exec path (~8 ms)

    try:
        priv = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise BadKeyError(f"reviewer key {path} is not a PEM private key: {e}") from None
    if not isinstance(priv, Ed25519PrivateKey):
        raise BadKeyError(f"reviewer key {path} is not an Ed25519 key")
    return ReviewerKey(path.name.removesuffix(".key"), priv, path)


def list_keys(home: Path) -> list[tuple[str, str, Path]]:
    """``(name, public key hex, private key path)`` of every reviewer key in ``home``."""
    d = reviewers_dir(home)
    out = []
    if d.is_dir():
        for p in sorted(d.glob("*.pub")):
            text = p.read_text().strip()
            if HEX_KEY_RE.fullmatch(text):
                out.append((p.name.removesuffix(".pub"), text, d / (p.stem + ".key")))
    return out


def own_public_keys(home: Path) -> tuple[str, ...]:
    """Public halves of the reviewer keys kept in ``home`` (the operator's own keys)."""
    try:
        return tuple(k for _, k, _ in list_keys(home))
    except OSError:
        return ()


def default_key(home: Path) -> ReviewerKey:
    """The only reviewer key in ``home``; more than one needs ``--key``."""
    keys = list_keys(home)
    if not keys:
        raise NotFoundError(f"no reviewer key in {reviewers_dir(home)}",
                            hint="create one with `kernel keys new --reviewer NAME`, or pass "
                            "--key FILE")
    if len(keys) > 1:
        raise UsageError(f"{len(keys)} reviewer keys in {reviewers_dir(home)}: choose one with "
                         "--key FILE")
    return load_key(keys[0][2])


def export_entry(name: str, public_hex: str) -> str:
    return f'[[reviewers]]\nname = "{name}"\npublic_key = "{public_hex}"\n'


def parse_keyring(data: bytes, where: str) -> tuple[Reviewer, ...]:
    """Strictly parse a keyring; any problem is a :class:`BadKeyError` naming file and entry."""
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise BadKeyError(f"keyring {where}: not valid TOML: {e}") from None
    extra = sorted(set(doc) - {"reviewers"})
    if extra:
        raise BadKeyError(f"keyring {where}: unknown key(s) {', '.join(extra)}",
                          hint="a keyring holds only [[reviewers]] tables")
    entries = doc.get("reviewers", [])
    if not isinstance(entries, list):
        raise BadKeyError(f"keyring {where}: reviewers must be [[reviewers]] tables")
    out: list[Reviewer] = []
    seen: set[str] = set()
    for i, ent in enumerate(entries):
        at = f"keyring {where}: reviewers[{i}]"
        if not isinstance(ent, dict) or set(ent) != {"name", "public_key"}:
            raise BadKeyError(f"{at}: want exactly name and public_key")
        name, pk = ent["name"], ent["public_key"]
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise BadKeyError(f"{at}.name: {name!r} is not a valid reviewer name")
        if name in seen:
            raise BadKeyError(f"{at}.name: duplicate reviewer {name!r}")
        seen.add(name)
        if not isinstance(pk, str) or not HEX_KEY_RE.fullmatch(pk):
            raise BadKeyError(f"{at}.public_key: want 64 lowercase hex digits")
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(pk))
        except ValueError as err:
            raise BadKeyError(f"{at}.public_key: not an Ed25519 key: {err}") from None
        out.append(Reviewer(name=name, public_key=pk))
    return tuple(out)


def keyring_path(spec: str, policy_source: str, home: Path) -> Path:
    """Where a policy's ``approvals.keyring`` points."""
    if spec.startswith("$KERNEL_HOME/"):
        return home / spec[len("$KERNEL_HOME/"):]
    p = Path(spec)
    if p.is_absolute():
        return p
    return Path(policy_source).resolve().parent / p


