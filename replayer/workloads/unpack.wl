# unpack.wl - the user unpacks a compressed archive that ships in the image: Python's HTML
# documentation (/usr/local/share/rm-data/python-docs.tar.gz, 13 MiB; 68 MiB in 1,133 files
# unpacked, which exist nowhere else in the image). A handful of keystrokes make ~70 MiB of new
# state (files on disk, the same in the page cache): what replay rebuilds at the target instead of
# shipping it.
# xterm at +0+0 (84x56 characters, ~508x732 px); no window manager, focus follows the pointer.
# Waits sized for a TCG guest; the user types ahead while a command runs (the shell reads it when
# the command is done), and the last wait covers everything. Ends with the files checked on the
# target: the checksums the user computed at the source, recomputed in the migrated VM, and the
# tree compared with the archive.

click 250 400
wait 0.5
type "mkdir -p /root/docs && cd /root/docs\n"
type "tar xzf /usr/local/share/rm-data/python-docs.tar.gz && echo unpacked\n"
wait 30                       # gunzip and 1,133 files under TCG
type "du -sh html; ls html | head -n 5\n"
type "find html -type f -print0 | sort -z | xargs -0 sha256sum > /root/docs.sha256\n"
wait 15                       # reading 68 MiB again
type "wc -l /root/docs.sha256 && sync\n"
wait 5

check "cd /root/docs && sha256sum --quiet --strict -c /root/docs.sha256"
check "tar -dzf /usr/local/share/rm-data/python-docs.tar.gz -C /root/docs"
