"""The exec registry (PROTOCOL.md §8.10) through the control client, against the real shim:
list_execs with tags, and attach_exec from an observer replaying the retained tail and
following live to the exit, with the errors for an offset no longer retained and an unknown
exec."""

from __future__ import annotations

import asyncio

import pytest

from agent_shim import AttachExit, AttachLagged, AttachOutput, RemoteError
from helpers import connect, run


def test_list_and_attach_follow_an_exec_from_another_client(shim_factory):
    shim = shim_factory(args=["--exec-retain", "1024"])

    async def go():
        async with await connect(shim, consumer="main") as owner:
            proc = await owner.exec(
                ["sh", "-c", "seq 1 1000; read x; echo done; exit 4"], stdin=True, tag="py:job"
            )
            async with await connect(shim, consumer=None) as obs:
                first = "".join(f"{i}\n" for i in range(1, 1001)).encode()
                for _ in range(200):
                    execs = await obs.list_execs()
                    mine = [e for e in execs if e.exec_id == proc.exec_id]
                    if mine and mine[0].output_bytes >= len(first):
                        break
                    await asyncio.sleep(0.05)
                info = mine[0]
                assert info.tag == "py:job" and info.owner == "control" and info.exit is None
                assert info.argv[0] == "sh" and info.output_bytes == len(first)
                # Older than retained: gap, with the oldest offset retained.
                with pytest.raises(RemoteError) as gap:
                    await obs.attach_exec(proc.exec_id, 0)
                assert gap.value.code == "gap"
                assert gap.value.first_available == len(first) - 1024
                with pytest.raises(RemoteError) as nf:
                    await obs.attach_exec(987654)
                assert nf.value.code == "not_found"
                att = await obs.attach_exec(proc.exec_id)
                assert att.running and att.from_offset == len(first) - 1024
                await proc.write(b"go\n")
                await proc.close_stdin()
                got = b""
                exit_item = None
                async for item in att:
                    if isinstance(item, AttachOutput):
                        assert item.offset == att.from_offset + len(got)
                        got += item.data
                    elif isinstance(item, AttachLagged):
                        raise AssertionError(f"lagged {item}")
                    elif isinstance(item, AttachExit):
                        exit_item = item
                assert got == first[-1024:] + b"done\n"
                assert exit_item is not None and exit_item.code == 4
                ended = [e for e in await obs.list_execs() if e.exec_id == proc.exec_id][0]
                assert ended.exit is not None and ended.exit["code"] == 4

    run(go())
