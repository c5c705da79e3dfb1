#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian 12 machine, idempotently:
#   - Debian packages (firejail, libcap-dev for python-prctl, python3-venv/-dev) when run as root;
#   - a virtual environment in .venv with the project and its dependencies.
# Re-running it is cheap: nothing is reinstalled when already present.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v firejail >/dev/null 2>&1 || need_pkgs+=(firejail)
[ -e /usr/include/sys/capability.h ] || need_pkgs+=(libcap-dev)
dpkg -s libseccomp2 >/dev/null 2>&1 || need_pkgs+=(libseccomp2)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
pyinc=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
[ -e "$pyinc/Python.h" ] || need_pkgs+=(python3-dev)
command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: installing Debian packages: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
  else
    echo "bootstrap: missing Debian packages: ${need_pkgs[*]}" >&2
    echo "bootstrap: run as root once, or: sudo apt-get install ${need_pkgs[*]}" >&2
    [[ " ${need_pkgs[*]} " == *" firejail "* ]] && [ ${#need_pkgs[@]} -eq 1 ] || exit 3
    echo "bootstrap: continuing without firejail (its tests will be skipped)" >&2
  fi
fi

stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing the project into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
