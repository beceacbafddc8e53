# build.wl - the user builds a small C project whose sources ship in the image: Lua 5.4
# (/usr/local/src/lua, 24,000 lines of C) with gcc and make, as a developer does while working on
# it: a debug build, `make MYCFLAGS="-O0 -g3"` (no optimisation, full debug info with macros: what
# gdb wants, and e.g. Eclipse CDT's default Debug configuration). A few keystrokes make the
# compiler's work: 33 object files, a library and two programs (~13 MB, most of it DWARF) on disk
# and in the page cache, and what gcc left in memory. gcc's output is deterministic (same sources,
# flags and paths; Debian's ar writes no timestamps), so a target that replays the session builds
# the same files. Why a debug build: it is the build a developer runs, and its output is content
# the target holds nowhere unless it replays (the release build `make` makes only ~1.5 MB, 0.25 MB
# compressed, so the ~0.5 MB residue of any session swamps it); measured against `make` and
# `make MYCFLAGS=-g` in bench/results/build-variants.md. It also compiles faster under TCG (-O0:
# ~53 s against ~130 s for -O2).
# xterm at +0+0 (84x56 characters, ~508x732 px); no window manager, focus follows the pointer.
# Waits sized for a TCG guest (the build is the long part).
# Ends with the files checked on the target: the checksums the user computed at the source,
# recomputed in the migrated VM, and the interpreter that was built, run.
#
# The user queues the run and the checksums on make's command line instead of typing them ahead
# while it builds: keys typed while a command prints echo among its output in the order they and it
# came, which a target whose build ends a key earlier or later does not reproduce; its screen then
# differs for good and the sync mark after it fails (bench/results/marks.md, "build"). No key comes
# while anything runs, whatever the build's flags and duration, and the prompt is back from `cp`
# before the next command is typed.

click 250 400
wait 0.5
type "cp -r /usr/local/src/lua /root/lua && cd /root/lua\n"
wait 3                        # the prompt is back: the next keys echo after it on both sides
type "make MYCFLAGS=\"-O0 -g3\" 2>&1 | tail -n 3 && src/lua -e 'local s = 0; for i = 1, 1000 do s = s + i * i end; print(s)' && sha256sum src/*.o src/*.a src/lua src/luac > /root/lua.sha256 && sync\n"
wait 150                      # gcc -O0 -g3 over 33 files under TCG: ~53 s alone, up to ~2.5x that with both sides' guests building at once on a loaded host

check "cd /root/lua && sha256sum --quiet --strict -c /root/lua.sha256"
check "/root/lua/src/lua -e 'assert(1 << 10 == 1024 and (\"ab\"):rep(2) == \"abab\")'"
