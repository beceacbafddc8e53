# unpack.wl - the user unpacks a compressed archive that ships in the image: Python's HTML
# documentation (/usr/local/share/rm-data/python-docs.tar.gz, 13 MiB; 68 MiB in 1,133 files
# unpacked, which exist nowhere else in the image). A handful of keystrokes make ~70 MiB of new
# state (files on disk, the same in the page cache): what replay rebuilds at the target instead of
# shipping it.
# xterm at +0+0 (84x56 characters, ~508x732 px); no window manager, focus follows the pointer.
# Waits sized for a TCG guest; the last wait covers everything. The user waits for a slow
# command's prompt before typing on: keys typed into a running command echo once from the terminal
# and again after the prompt, in a layout that depends on when the command finishes, which the
# replay does not reproduce (the target's xterm then differs for good and every later mark fails;
# the files are the same). A pause lets the agent mark the prompt and the replay wait for it. Ends
# with the files checked on the target: the checksums the user computed at the source, recomputed
# in the migrated VM, and the tree compared with the archive.

click 250 400
wait 0.5
type "mkdir -p /root/docs && cd /root/docs\n"
type "tar xzf /usr/local/share/rm-data/python-docs.tar.gz && echo unpacked\n"
wait 30                       # gunzip and 1,133 files under TCG
type "du -sh html; ls html | head -n 5\n"
wait 3                        # reads du's answer before typing on (see below)
type "find html -type f -print0 | sort -z | xargs -0 sha256sum > /root/docs.sha256\n"
wait 15                       # reading 68 MiB again
type "wc -l /root/docs.sha256 && sync\n"
wait 5

check "cd /root/docs && sha256sum --quiet --strict -c /root/docs.sha256"
check "tar -dzf /usr/local/share/rm-data/python-docs.tar.gz -C /root/docs"
