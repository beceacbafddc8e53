# generate.wl - the user runs a program that computes a data set and writes it: gen-dataset (in the
# image, /usr/local/bin) makes 32 MiB of synthetic weather measurements as CSV from a seed, then
# awk sums them up per station. A few keystrokes make ~35 MiB of new, compressible (~3x) data on
# disk and in the page cache, and the generator's freed heap: the same bytes at a target that
# replays the session, as the computation is deterministic.
# xterm at +0+0 (84x56 characters, ~508x732 px); no window manager, focus follows the pointer.
# Waits sized for a TCG guest, with room for a loaded host: the user types on once the prompt is
# back (keys typed while a command prints echo among its output in an order a target does not
# reproduce, and the mark after them fails: bench/results/marks.md, "build"). Ends with the files
# checked on the target: the checksums the user computed at the source, recomputed in the
# migrated VM.

click 250 400
wait 0.5
type "mkdir -p /root/data && cd /root/data\n"
wait 1                        # the prompt is back: the next keys echo after it on both sides
type "gen-dataset --seed 7 --mib 32 weather.csv\n"
wait 80                       # ~780,000 rows from Python under TCG: 40-56 s, the prompt is back
type "awk -F, 'NR > 1 { t[$2] += $5; n[$2]++ } END { for (s in t) printf \"%s %.3f\\n\", s, t[s] / n[s] }' weather.csv | sort > means.txt\n"
wait 15
type "head -n 3 means.txt; sha256sum weather.csv means.txt > /root/data.sha256 && sync\n"
wait 8

check "cd /root/data && sha256sum --quiet --strict -c /root/data.sha256"
check "test $(wc -l < /root/data/means.txt) -eq 400"
