"""agent-shim for Python: a driver SDK and a control client (asyncio first).

Drivers: subclass :class:`Driver`, implement ``on_task(task, ctx)``, call ``run()``.
Control planes: ``await Client.connect("unix:/run/agent.sock", token=...)``.
The wire protocol is docs/PROTOCOL.md of the agent-shim repository.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AgentShimError,
    AuthenticationError,
    BadPath,
    ConnectionClosed,
    FileChanged,
    NoSpace,
    NotFound,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    ShimTimeout,
    TaskFailed,
)
from .process import ExecResult, Process, TtySize  # noqa: E402
from .token import TOKEN_ENV, read_token, token_from_env  # noqa: E402
from .driver import Context, Driver, Task, TaskContext  # noqa: E402
from .control import (  # noqa: E402
    AttachExit,
    AttachLagged,
    Attachment,
    AttachOutput,
    Client,
    Event,
    ExecInfo,
    Lagged,
    Status,
)
from .files import FileEvent, FileReader, Files, FileStat, ListPage, Watch  # noqa: E402

__all__ = [
    "__version__",
    "AttachExit",
    "AttachLagged",
    "Attachment",
    "AttachOutput",
    "ExecInfo",
    "AgentShimError",
    "AuthenticationError",
    "ConnectionClosed",
    "ProtocolError",
    "RemoteError",
    "NotFound",
    "BadPath",
    "PermissionDenied",
    "NoSpace",
    "FileChanged",
    "ShimTimeout",
    "TaskFailed",
    "ExecResult",
    "Process",
    "TtySize",
    "TOKEN_ENV",
    "read_token",
    "token_from_env",
    "Context",
    "Driver",
    "Task",
    "TaskContext",
    "Client",
    "Event",
    "Lagged",
    "Status",
    "Files",
    "FileStat",
    "ListPage",
    "FileReader",
    "FileEvent",
    "Watch",
]
