# Sourced by the other scripts: make `uv` available on a fresh machine that has only Python + pip.
if ! command -v uv >/dev/null 2>&1; then
    export PATH="$HOME/.local/bin:$PATH"
fi
if ! command -v uv >/dev/null 2>&1; then
    echo "uv not found: installing it with pip (python3 -m pip install --user uv)" >&2
    python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv
fi
command -v uv >/dev/null 2>&1 || { echo "error: could not install uv" >&2; exit 1; }
