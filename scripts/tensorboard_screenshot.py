"""What a user sees first when TensorBoard opens a sweep: `python scripts/tensorboard_screenshot.py
outputs/multiruns/<date>_<time>` starts `tensorboard --logdir <sweep dir>` on a free local port, waits until it
serves every run, and saves a headless Chromium's screenshot of each dashboard asked for (by default Time Series,
the tab TensorBoard opens on, and HParams) as <out>_<dashboard>.png (default: <sweep dir>/tensorboard_*.png). Needs
Chromium (Debian: `apt-get install chromium`)."""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gpt2lab.errors import ConfigError, exit_on_user_error

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(server: subprocess.Popen, url: str, timeout_s: float = 120) -> list[str]:
    """The runs TensorBoard serves, once it has read them (it loads event files in the background)."""
    deadline, runs, seen_at = time.monotonic() + timeout_s, [], 0.0
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"tensorboard exited: {server.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                now = json.loads(response.read())
        except OSError:  # not listening yet
            now = []
        if now and now == runs and time.monotonic() - seen_at > 3:  # the same runs for 3 s: all read
            return runs
        if now != runs:
            runs, seen_at = now, time.monotonic()
        time.sleep(1)
    raise RuntimeError(f"tensorboard served no runs within {timeout_s:.0f} s at {url}")


def screenshot(browser: str, url: str, path: Path, width: int, height: int) -> None:
    # --virtual-time-budget: let the page's scripts fetch and draw the charts before the shot is taken
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={width},{height}",
           "--virtual-time-budget=20000", f"--screenshot={path}", url]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=180)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("logdir", type=Path, help="a multirun's sweep dir, e.g. outputs/multiruns/<date>_<time>")
    parser.add_argument("--out", type=Path, help="path prefix of the screenshots (default: <logdir>/tensorboard)")
    parser.add_argument("--dashboards", nargs="+", default=["timeseries", "hparams"], help="TensorBoard's #<tab>s")
    parser.add_argument("--size", default="1400x900", help="the browser window, WIDTHxHEIGHT")
    args = parser.parse_args()
    with exit_on_user_error():
        browser = next((b for b in BROWSERS if shutil.which(b)), None)
        if browser is None:
            raise ConfigError(f"no headless browser ({', '.join(BROWSERS)}) on PATH: install one, e.g. "
                              "`apt-get install chromium`")  # fmt: skip
        if not args.logdir.is_dir():
            raise ConfigError(f"{args.logdir}: no such dir; pass a sweep dir, e.g. outputs/multiruns/<date>_<time>")
    out = args.out or args.logdir / "tensorboard"
    width, height = map(int, args.size.split("x"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(args.logdir), "--host", "127.0.0.1",
           "--port", str(port), "--load_fast", "false"]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        print(f"tensorboard at {url} serves {', '.join(wait_for_runs(server, url))}")
        for dashboard in args.dashboards:
            path = out.with_name(f"{out.name}_{dashboard}.png")
            screenshot(browser, f"{url}/#{dashboard}", path, width, height)
            print(f"{dashboard}: {path}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
