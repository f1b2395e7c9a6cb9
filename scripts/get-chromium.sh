#!/usr/bin/env bash
# Make sure a headless browser is there for the test that renders report.html (tests/test_report_browser.py):
# install Debian's chromium when apt is there. Without one the test skips, except under CI=true, where it fails.
set -u
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || [ -n "${NORMLAB_CHROMIUM:-}" ]; then
  exit 0
fi
exec bash "$(dirname "$0")/apt-install.sh" chromium "the headless browser that checks report.html renders" \
  "the browser test of the report skips (set NORMLAB_CHROMIUM to a chromium binary to run it)"
