"""The proxy's command line with uvloop hidden: servers fall back to the asyncio loop.

python bench/without_uvloop.py --port N --server hypercorn
"""

from __future__ import annotations

import sys

sys.modules["uvloop"] = None  # type: ignore[assignment]  # "import uvloop" now fails

from imageworks.chat_proxy.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
