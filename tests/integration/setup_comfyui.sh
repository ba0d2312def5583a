#!/usr/bin/env bash
# Build a ComfyUI checkout and its venv for the real-ComfyUI tests. ComfyUI's code is never
# committed here: this script rebuilds it from a git source each time.
#
#   tests/integration/setup_comfyui.sh SOURCE DEST [REV]
#
# SOURCE  a git repository: a URL (https://github.com/Comfy-Org/ComfyUI) or a local git directory,
#         bare or not — e.g. the snapshot a `fetch` of github:DenBlacky808/ComfyUI_custom_amd
#         leaves (upstream ComfyUI 0.22.0 of 2026-05-26 plus one commit that makes comfy-aimdo
#         optional), or of github:Comfy-Org/ComfyUI (0.3.64, 2025-10-12).
# DEST    folder to create: DEST/ComfyUI (the tree) and DEST/venv (unless VENV names another).
# REV     commit or branch (default HEAD).
#
# Environment:
#   VENV=DIR         use / create this venv instead of DEST/venv (one venv serves both trees)
#   COMFY_TORCH="…"  the torch packages to install; ComfyUI ≥ 0.15 imports torchaudio, and PyPI's
#                    torchaudio stops at 2.11, so the default is the matching CUDA triple
#                    torch 2.11.0 + torchvision 0.26.0 + torchaudio 2.11.0 (several GB; runs on the CPU)
#   FRONTENDS="1.27.10 1.58.1"  also `pip install --target DEST/frontend-<v>` these frontends
#
# Snapshots may lack their largest files (tokenizer vocabularies): those are skipped and listed;
# the tests never build a text encoder from them.
#
# Then, from the repository root:
#   COMFYUI_PATH=DEST/ComfyUI DEST/venv/bin/python -m pytest --run-slow tests/integration
# (for 0.3.64 add COMFYUI_FRONTEND_ROOT=DEST/frontend-1.27.10, its pinned frontend, when the venv
# was made for the newer tree).
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
source_repo=$1
dest=$2
rev=${3:-HEAD}
venv=${VENV:-$dest/venv}
torch_packages=${COMFY_TORCH:-"torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0"}

mkdir -p "$dest"
tree=$dest/ComfyUI
if [ -e "$tree" ]; then
  echo "error: $tree exists; remove it or choose another DEST" >&2
  exit 1
fi

if [ -d "$source_repo" ]; then
  gitdir=$source_repo
  [ -d "$source_repo/.git" ] && gitdir=$source_repo/.git
else
  gitdir=$dest/source.git
  git clone --bare --filter=blob:limit=20m "$source_repo" "$gitdir"
fi

# Extract blob by blob: a snapshot without its largest blobs would stop `git archive`.
mkdir -p "$tree"
missing=0
while IFS=$'\t' read -r meta path; do
  read -r _mode kind sha <<<"$meta"
  [ "$kind" = blob ] || continue
  mkdir -p "$tree/$(dirname "$path")"
  if ! git --git-dir="$gitdir" cat-file blob "$sha" >"$tree/$path" 2>/dev/null; then
    rm -f "$tree/$path"
    echo "skipped (not in this snapshot): $path" >&2
    missing=$((missing + 1))
  fi
done < <(git --git-dir="$gitdir" ls-tree -r "$rev")
echo "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$tree/comfyui_version.py") in $tree ($missing file(s) skipped)"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
fi
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet $torch_packages
grep -vE '^(torch|torchvision|torchaudio)([<>=].*)?$' "$tree/requirements.txt" >"$dest/requirements-no-torch.txt"
"$venv/bin/pip" install --quiet -r "$dest/requirements-no-torch.txt" requests pytest pyyaml einops psutil
for version in ${FRONTENDS:-}; do
  "$venv/bin/pip" install --quiet --no-deps --target "$dest/frontend-$version" "comfyui-frontend-package==$version"
done
echo "ready: COMFYUI_PATH=$tree $venv/bin/python -m pytest --run-slow tests/integration"
