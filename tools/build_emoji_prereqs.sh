#!/usr/bin/env bash
# Install what tools/build_emoji.py needs to rebuild data_manifests/emoji.
# Debian tools: the Noto Color Emoji font (image style "noto"), espeak-ng (speech),
# sox + libsox-fmt-all (resampling to 16 kHz mono) and flac (encoding).
# npm sources (pinned so the committed checksums stay reproducible) are packed into a cache
# dir outside the repo: emojibase-data (CLDR annotations en/zh) and emoji-datasource-twitter
# (Twemoji PNGs, CC BY 4.0). The builder fetches them itself too if they are missing.
# Python: Pillow (with RAQM, as in the PyPI wheels) and tokenizers, in the project's venv.
set -euo pipefail
CACHE="${MMSTORY_EMOJI_CACHE:-$HOME/.cache/mmstory/emoji_sources}"

SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
    fonts-noto-color-emoji espeak-ng sox libsox-fmt-all flac
# npm: only if missing (a nodejs package from elsewhere may already provide it).
if ! command -v npm >/dev/null; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm
fi

mkdir -p "$CACHE"
cd "$CACHE"
for pkg in emojibase-data@17.0.0 emoji-datasource-twitter@16.0.0; do
    name="${pkg%@*}"; ver="${pkg#*@}"
    if [ ! -f "$name-$ver.tgz" ]; then npm pack "$pkg" --silent >/dev/null; fi
    if [ ! -d "$name-$ver/package" ]; then mkdir -p "$name-$ver" && tar xzf "$name-$ver.tgz" -C "$name-$ver"; fi
done
echo "emoji sources ready in $CACHE"
