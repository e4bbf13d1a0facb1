"""The subreaper's sweeper, in a process of its own (being a subreaper is for the whole process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCENARIO = textwrap.dedent(
    """
    import asyncio, json, os, subprocess, sys
    from cri.system import reaper

    async def main():
        reaper.become_subreaper()
        sweeper = reaper.Sweeper(delay=0.05)
        sweeper.start()
        try:
            # Orphans: each sh exits at once, its sleep is adopted by us and exits a moment later.
            for _ in range(5):
                subprocess.run(["sh", "-c", "sleep 0.1 &"], check=True, timeout=10)
            # One adopted process that wait_child waits for: its status is ours, not the sweeper's.
            out = subprocess.run(["sh", "-c", "sh -c 'sleep 0.3; exit 7' & echo $!"], check=True,
                                 capture_output=True, text=True, timeout=10)
            awaited = await asyncio.wait_for(reaper.wait_child(int(out.stdout)), 10)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if not reaper._zombie_children():
                    break
            print(json.dumps({"awaited": awaited, "zombies": reaper._zombie_children()}), flush=True)
        finally:
            sweeper.close()

    asyncio.run(main())
    """
)


def test_adopted_orphans_are_reaped_and_an_awaited_one_is_left_to_its_waiter():
    argv = [sys.executable, "-c", SCENARIO]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout)
    assert outcome == {"awaited": 7, "zombies": []}
