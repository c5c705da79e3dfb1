"""The demo's child agent: spawned by agent.py, with a budget of one written file."""

from syscalls.client import Kernel, SyscallError

k = Kernel.from_env()  # registers its signed manifest before its first call
k.write("REVIEW.md", b"# Review\n\nadd() is tested.\n")
print("  child agent: wrote REVIEW.md")
try:
    k.write("REVIEW2.md", b"over budget\n")
except SyscallError as e:
    print(f"  child agent: second file refused, rule {e.rule} (its budget was one file)")
