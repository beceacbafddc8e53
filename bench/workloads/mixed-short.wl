# mixed-short.wl - bench/ only: replayer/workloads/mixed.wl trimmed to ~1/3 of its length so that
# `make bench` fits in 30 minutes (mixed.wl runs ~5 min). The same steps in the same windows -
# shell, notes, double-click and retype, scroll, shortcuts, the Save button, tar, sync - with
# shorter text and the reading pauses cut to a few seconds.
# Screen 1280x800: xterm at +0+0, notepad at +520+0 (Save at its top-left, text area below).

# --- start in the shell
click 250 380
wait 1
type "mkdir -p /root/project && cd /root/project\n"
type "printf 'alpha\\nbeta\\n' > words.txt\n"
type "seq 1 20000 | sha256sum > digest.txt\n"
wait 4                        # let it finish under TCG

# --- take notes about it
move 780 450
click 780 450
wait 0.5
key ctrl+End
type "\nProject log\n"
type "Digest of 1..20000 in digest.txt.\n"
key ctrl+s
wait 3

# --- select a word with a double click and replace it
doubleclick 560 60
wait 0.5
type "Journal"
key ctrl+End
scroll 780 450 up 3
wait 1
scroll 780 450 down 3
wait 3

# --- back to the shell, with keyboard shortcuts
move 250 420
wait 0.5
type "cp words.txt words.bak && sed -i 's/beta/BETA/' words.txt\n"
key ctrl+l
type "tar cf project.tar words.txt digest.txt && tar tf project.tar\n"
wait 3
scroll 250 420 up 5
wait 1
scroll 250 420 down 5
wait 2

# --- notes again, saved with the button
click 900 600
wait 0.5
key ctrl+End
type "Archived in project.tar.\n"
key shift+Up
key ctrl+End
click 560 14                  # Save button
wait 3

# --- last shell round, then quiesce
click 300 500
wait 0.5
type "wc -l /root/notes.txt /root/project/*.txt\n"
wait 2
type "cd /root && sync\n"
wait 5
