#!/usr/bin/env bash
# The user pass: the test tiers that do not need root, run by an ordinary user, as most operators
# run the kernel (native backend on unprivileged user namespaces; firejail refused with its
# reason). Run as root: `make test` runs it after the root pass; alone:
#
#   scripts/run-user-tests.sh                    # the default selection (see SELECTION below)
#   scripts/run-user-tests.sh tests/unit/test_paths.py -k symlink   # any pytest arguments
#
# What it does, idempotently:
#   - creates the user $KERNEL_TEST_USER (default kernel-test-user) with useradd if missing;
#   - gives it $KERNEL_USER_TESTS_DIR (default /var/tmp/agent-kernel-user-tests), owned by it:
#       src/   a copy of this checkout (tracked and untracked-but-not-ignored files), refreshed
#              on every run, because the checkout may live where the user cannot go (/root);
#       venv/  a virtual environment made by the user with a system interpreter it can run (of
#              the same Python version as .venv), holding a copy of .venv's installed packages:
#              no download, so it works offline; rebuilt only when .venv changes;
#   - runs pytest there as that user, with CI passed through. Tests that need root are skipped
#     with their reason (tests/conftest.py); under CI=true a run that collects nothing or in
#     which no test passes fails, and so does a skip whose reason is not "needs root".
# Every file under that directory is written by the user itself (root only reads the checkout
# and .venv and streams them), so nothing the user controls is ever followed by root.
set -uo pipefail
cd "$(dirname "$0")/.."

# The tiers that matter for an ordinary user, within a few minutes on 2 cores: unit, the
# integration and adversarial tiers (on native; firejail tests skip with their reason, root, and
# test_ordinary_user.py checks that the kernel refuses firejail to a user with that reason), the
# golden gate table, and the corpus through `kernel selftest` (test_ordinary_user.py).
# Left out, because they compute the same whoever runs them: the fuzz tests, and the corpus run
# directly through the sandbox contract or under `kernel exec` (selftest runs the same corpus).
SELECTION=(
  tests/unit tests/integration tests/adversarial tests/golden
  --deselect tests/unit/test_fuzz_atheris.py
  --deselect tests/unit/test_fuzz_properties.py
  --deselect tests/adversarial/test_corpus.py::test_attack_is_stopped
  --deselect tests/adversarial/test_corpus_under_kernel.py
)

USER_NAME=${KERNEL_TEST_USER:-kernel-test-user}
BASE=${KERNEL_USER_TESTS_DIR:-/var/tmp/agent-kernel-user-tests}

say() { echo "user-tests: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (it creates the user and switches to it); as an ordinary
user, run pytest directly: .venv/bin/python -m pytest tests/unit"
[ -x .venv/bin/python ] || die "no .venv: run 'make bootstrap' first"
command -v setpriv >/dev/null || die "setpriv (util-linux) is missing"

if ! id -u "$USER_NAME" >/dev/null 2>&1; then
  command -v useradd >/dev/null || die "useradd is missing and user $USER_NAME does not exist"
  say "creating the ordinary user $USER_NAME"
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
    "$USER_NAME" || die "useradd $USER_NAME failed"
fi
uid=$(id -u "$USER_NAME")
gid=$(id -g "$USER_NAME")
[ "$uid" != 0 ] || die "$USER_NAME is root"
as_user=(setpriv "--reuid=$uid" "--regid=$gid" --clear-groups --inh-caps=-all --)
user_env=(env -i PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 HOME="$BASE/home"
          TMPDIR=/tmp "CI=${CI:-}" PYTHONDONTWRITEBYTECODE=1)
run_as_user() { (cd / && "${as_user[@]}" "${user_env[@]}" "$@"); }

# The working directory: owned by the user, created by root only when absent.
if [ -L "$BASE" ] || { [ -e "$BASE" ] && [ "$(stat -c %u "$BASE")" != "$uid" ]; }; then
  die "$BASE exists and is not a directory owned by $USER_NAME: remove it or set" \
      "KERNEL_USER_TESTS_DIR"
fi
[ -d "$BASE" ] || install -d -o "$uid" -g "$gid" -m 0700 "$BASE" || die "cannot create $BASE"
run_as_user mkdir -p "$BASE/home" || die "$USER_NAME cannot write in $BASE"

# An interpreter the user can run, of the version .venv was made with (so the copied compiled
# packages fit it).
want=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
base_py=$(.venv/bin/python -c 'import sys; print(getattr(sys, "_base_executable", ""))')
py=""
for cand in "$base_py" "/usr/bin/python$want" "/usr/local/bin/python$want" /usr/bin/python3; do
  [ -n "$cand" ] && [ -x "$cand" ] || continue
  if run_as_user "$cand" -c "import sys, venv; assert '%d.%d' % sys.version_info[:2] == '$want'" \
      2>/dev/null; then
    py=$cand
    break
  fi
done
[ -n "$py" ] || die "no Python $want that $USER_NAME can run (.venv's is $base_py): install" \
  "python$want for all users (apt-get install python3 python3-venv)"

# The venv: rebuilt when .venv, the interpreter or the project's dependencies change.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp="$py $(stat -c %Y .venv/.installed 2>/dev/null) $(sha256sum pyproject.toml | cut -c1-16)"
venv="$BASE/venv"
if [ "$(cat "$venv/.stamp" 2>/dev/null)" != "$stamp" ]; then
  say "making $venv with $py and the packages of .venv"
  run_as_user rm -rf "$venv" || die "cannot remove the old $venv"
  run_as_user "$py" -m venv --without-pip "$venv" || die "$py -m venv failed"
  user_site=$(run_as_user "$venv/bin/python" -c \
    'import sysconfig; print(sysconfig.get_paths()["purelib"])') || die "broken $venv"
  tar -C "$site" --exclude='./__editable__*' --exclude='./agent_kernel-*' -cf - . \
    | run_as_user tar -C "$user_site" -xf - || die "cannot copy the packages of .venv"
  echo "$BASE/src" | run_as_user tee "$user_site/agent_kernel_src.pth" >/dev/null
  echo "$stamp" | run_as_user tee "$venv/.stamp" >/dev/null
fi

# The copy of the checkout, fresh on every run (a few MiB).
say "copying the checkout to $BASE/src"
run_as_user rm -rf "$BASE/src.new" && run_as_user mkdir "$BASE/src.new" \
  || die "cannot prepare $BASE/src.new"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard \
    | .venv/bin/python -c 'import os, sys
names = [n for n in sys.stdin.buffer.read().split(b"\0") if n and os.path.lexists(n)]
sys.stdout.buffer.write(b"\0".join(names))' \
    | tar --null --no-recursion -T - -cf -
else
  tar --exclude=./.venv --exclude=./.git --exclude='./runs/*' --exclude='*/__pycache__' \
    --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache -cf - .
fi | run_as_user tar -C "$BASE/src.new" -xf - || die "cannot copy the checkout"
run_as_user rm -rf "$BASE/src" && run_as_user mv "$BASE/src.new" "$BASE/src" \
  || die "cannot replace $BASE/src"

if [ $# -gt 0 ]; then
  args=("$@")
else
  args=("${SELECTION[@]}")
fi
say "running pytest as $USER_NAME (uid $uid) in $BASE/src: ${args[*]}"
(cd "$BASE/src" && "${as_user[@]}" "${user_env[@]}" "$venv/bin/python" -m pytest "${args[@]}")
rc=$?
if [ "$rc" = 5 ]; then
  say "pytest collected no test: failing"
  exit 1
fi
exit "$rc"
