"""Print pip's configured package locations as uv arguments, so `make` installs with uv what pip would.

uv installs jaxdl's test environment in seconds where pip takes over a minute, but it does not read
pip's configuration files or PIP_* variables. This hands over the settings that choose packages:
index URLs, find-links and constraint files (local paths that do not exist are left out; pip only
warns about them, uv would fail). pip takes the newest release from any index; uv, by default,
only looks past the first index that has a package, so it is told to choose as pip does.
"""
import os
import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
         "find-links": "--find-links", "constraint": "--constraint"}


def local_path(location: str) -> str | None:
    if location.startswith("file://"):
        return location.removeprefix("file://")
    return None if "://" in location else location


def uv_args(pip_config_list: str) -> list[str]:
    args: list[str] = ["--index-strategy", "unsafe-best-match"]
    for line in pip_config_list.splitlines():
        key, _, value = line.partition("=")
        flag = FLAGS.get(key.rsplit(".", 1)[-1])
        if flag is None or not value:
            continue
        for location in " ".join(shlex.split(value)).split():
            path = local_path(location)
            if path is not None and not os.path.exists(path):
                continue
            pair = [flag, location]
            if not any(args[i:i + 2] == pair for i in range(2, len(args), 2)):
                args += pair
    return args


if __name__ == "__main__":
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    print(shlex.join(uv_args(listed)))
