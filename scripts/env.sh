# Sourced by the scripts in this folder (from the repository root): tool caches go to the project's .cache/
# (gitignored), not the home folder. A variable already set is kept (e.g. HF_HOME pointing at a cache that holds
# the hub models); a `hf auth login` token in the default place is still read.
: "${HF_TOKEN_PATH:=${HF_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/huggingface}/token}"
: "${XDG_CACHE_HOME:=$PWD/.cache}"  # pip, Snakemake and other tools that follow the XDG spec
: "${MPLCONFIGDIR:=$PWD/.cache/matplotlib}"
: "${HF_HOME:=$PWD/.cache/huggingface}"
: "${TORCH_HOME:=$PWD/.cache/torch}"
export HF_TOKEN_PATH XDG_CACHE_HOME MPLCONFIGDIR HF_HOME TORCH_HOME
