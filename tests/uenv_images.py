"""uenv images for tests: software built for /user-environment, as Spack builds it.

`greet_files` builds, with the machine's C compiler, a program linked with
`-Wl,-rpath,/user-environment/lib` against a shared library of the image, a script whose `#!`
names an interpreter of the image, and a meta/env.json with a view: none of it runs unless
the image sits at /user-environment.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

CC = shutil.which("cc") or shutil.which("gcc")

LIBRARY = 'const char *greeting(void) { return "hello from libgreet"; }\n'
PROGRAM = ('#include <stdio.h>\nconst char *greeting(void);\n'
           'int main(void) { puts(greeting()); return 0; }\n')
SCRIPT = '#!/user-environment/bin/interp\necho "script run by $0"\n'


def view_json(mount: str, name: str) -> dict[str, object]:
    return {"description": f"the {name} view", "root": mount, "env": {"version": 1, "values": {
        "list": {"PATH": [{"op": "prepend", "value": [f"{mount}/bin"]}]},
        "scalar": {f"{name.upper()}_HOME": mount}}}}


def meta_json(name: str, mount: str, view: str) -> str:
    return json.dumps({"name": name, "description": f"{name} for tests", "mount": mount,
                       "views": {view: view_json(mount, view)}})


def compile_greet(work: Path) -> dict[str, bytes]:
    """bin/greet and lib/libgreet.so, built with the library's path compiled in."""
    if CC is None:
        pytest.fail("a C compiler (cc) is needed to build the test program")
    (work / "libgreet.c").write_text(LIBRARY)
    (work / "greet.c").write_text(PROGRAM)
    subprocess.run([CC, "-shared", "-fPIC", "-o", str(work / "libgreet.so"),
                    str(work / "libgreet.c")], check=True)
    subprocess.run([CC, "-o", str(work / "greet"), str(work / "greet.c"), f"-L{work}",
                    "-lgreet", "-Wl,-rpath,/user-environment/lib"], check=True)
    return {"bin/greet": (work / "greet").read_bytes(),
            "lib/libgreet.so": (work / "libgreet.so").read_bytes()}


def greet_files(work: Path) -> dict[str, bytes | str]:
    """The files of the image `greet` (built for /user-environment), compiled in *work*."""
    return {**compile_greet(work), "bin/hello": SCRIPT,
            "bin/interp": Path("/bin/sh").read_bytes(), "share/data.txt": "data of greet\n",
            "meta/env.json": meta_json("greet-env", "/user-environment", "default")}
