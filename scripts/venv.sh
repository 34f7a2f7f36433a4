# Sourced by the other scripts: `venv_install [EXTRA...]` creates (once) and
# activates the project's virtual environment in .venv (or $LMWATCH_VENV), then
# installs lmwatch into it with the extras named. Nothing goes into a system Python.
_lmwatch_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

venv_install() {
    local venv_dir="${LMWATCH_VENV:-$_lmwatch_repo/.venv}" extras
    if [ ! -x "$venv_dir/bin/python" ]; then
        if ! python3 -m venv "$venv_dir" 2>/dev/null; then
            rm -rf "$venv_dir"
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
                echo "venv: installing python3-venv (Debian's python3 lacks venv without it)" >&2
                apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null
                python3 -m venv "$venv_dir"
            else
                echo "venv: 'python3 -m venv' failed; install your distribution's venv package" \
                     "(on Debian: apt-get install python3-venv) and run again" >&2
                return 1
            fi
        fi
    fi
    # shellcheck disable=SC1091
    . "$venv_dir/bin/activate"
    extras="$(IFS=,; echo "$*")"
    python -m pip install --quiet --disable-pip-version-check \
        -e "$_lmwatch_repo${extras:+[$extras]}"
}
