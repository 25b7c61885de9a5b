"""``python -m serving``: run the service locally (a private Ray instance on 127.0.0.1), tiny preset by default.

    python -m serving                                  # tiny models on CPU, http://127.0.0.1:8000
    python -m serving --port 8100 adapters_root=runs/adapters
    python -m serving --config serving/configs/lumina7b.yaml

Stops Ray Serve and the Ray instance it started on Ctrl-C.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from cluster.local import apply_project_env
from stylear_core.config import describe

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def main(argv: Sequence[str] | None = None) -> None:
    """Parse ``--config``, ``--host``, ``--port``, ``--num-cpus`` and ``key=value`` overrides, then serve until Ctrl-C."""
    apply_project_env()
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.config import ServingConfig

    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Run the StyleAR generation service on a private local Ray instance.",
        epilog="config keys:\n" + "\n".join(describe(ServingConfig)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="serving YAML (serving/configs/)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs the local Ray instance offers")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. adapters_root=runs/adapters")
    args = parser.parse_args(argv)

    application = build_app({"config_file": str(args.config), "overrides": list(args.overrides)})
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=tempfile.mkdtemp(prefix="sar-serve-", dir="/tmp"),
    )
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application, name="stylear", route_prefix="/")
        print(f"StyleAR service on http://{args.host}:{args.port} (POST /v1/generate/style, Ctrl-C stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
