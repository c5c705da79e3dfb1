#!/usr/bin/env bash
# The demo: a fresh workspace, a demo agent under `kernel exec`, the run folder, its verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WS=demo/workspace
rm -rf "$WS"
mkdir -p "$WS/src" "$WS/tests" "$WS/.git"
printf '[core]\n\trepositoryformatversion = 0\n' > "$WS/.git/config"
cat > "$WS/src/app.py" <<'PY'
def add(a, b):
    return a + b
PY
cat > "$WS/tests/test_app.py" <<'PY'
import sys, unittest
sys.path.insert(0, "src")
from app import add

class AppTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)
PY
cp demo/agent.py demo/reviewer.py "$WS/"
chmod -R a+rX demo

echo "== kernel exec -- python3 agent.py   (workspace $WS, policy default)"
set +e
$BIN/kernel exec --workspace "$WS" --runs-dir runs --json -- /usr/bin/python3 agent.py \
  > demo/last-run.json
rc=$?
set -e
run_dir=$($BIN/python -c 'import json,sys; print(json.load(open("demo/last-run.json"))["run_dir"])')
echo
echo "== kernel exec exited $rc: $(cat demo/last-run.json)"
echo
echo "== the workspace after the run"
(cd "$WS" && find . -path ./.git -prune -o -type f -print | sort)
test -e demo/outside.txt && { echo "outside.txt exists: escape!"; exit 1; }
test -e "$WS/.git/hooks/pre-commit" && { echo "protected hook written!"; exit 1; }
echo
echo "== the run folder $run_dir"
(cd "$run_dir" && find . -type f | sort | sed 's/^/  /' | head -40)
echo
echo "== its event log (one record per request and decision, hash-chained)"
$BIN/python - "$run_dir" <<'PY'
import json, sys, pathlib
for line in (pathlib.Path(sys.argv[1]) / "log" / "events.jsonl").read_text().splitlines():
    e = json.loads(line)
    b = e["body"]
    extra = ""
    if e["type"] == "syscall.request":
        a = b.get("args", {})
        extra = f'{b.get("call")} {a.get("op", "")} {a.get("path", a.get("argv", ""))}'
    elif e["type"] == "syscall.decision":
        extra = f'{b["decision"]:8} {b["rule"]}'
    elif e["type"] in ("agent.exit", "run.end"):
        extra = f'status={b.get("status")} exit={b.get("exit_code")}'
    print(f'  {e["seq"]:3} {e["type"]:18} {extra}')
PY
echo
echo "== kernel verify $run_dir   (with its child's folder)"
$BIN/kernel verify "$run_dir"
echo
echo "== kernel runs   (the tree)"
$BIN/kernel runs --runs-dir runs | tail -3
