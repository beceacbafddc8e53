# mixed.wl - several minutes of both apps, mouse and keyboard, with pauses where a user reads.
# Screen 1280x800, no window manager: keyboard focus follows the pointer.
# xterm at +0+0 (84x56 chars, ~508x732 px); notepad at +520+0 (500x740, Save at its top-left,
# Clear next to it, text area below). Ends with everything saved and synced.

# --- start in the shell
click 250 380
wait 1
type "mkdir -p /root/project && cd /root/project\n"
type "printf 'alpha\\nbeta\\ngamma\\n' > words.txt\n"
type "sort -r words.txt > reversed.txt && cat reversed.txt\n"
wait 2
type "seq 1 20000 | sha256sum > digest.txt\n"
wait 4                        # let it finish under TCG
type "cat digest.txt\n"
wait 5                        # the user reads the output

# --- take notes about it
move 700 300
move 780 450
click 780 450
wait 0.5
key ctrl+End
type "\nProject log\n"
type "-----------\n"
type "Created /root/project with words.txt and reversed.txt.\n"
type "The digest of 1..20000 is in digest.txt.\n"
wait 2
key ctrl+s
wait 8                        # thinking

# --- select a word with a double click and replace it
doubleclick 560 60
wait 0.5
type "Journal"
wait 1
key ctrl+End
type "Renamed the heading.\n"
scroll 780 450 up 3
wait 1
scroll 780 450 down 3
wait 10                       # reading

# --- back to the shell: more work, with keyboard shortcuts
move 400 500
move 250 420
wait 0.5
type "ls -la\n"
wait 1
type "cp words.txt words.bak && sed -i 's/beta/BETA/' words.txt\n"
type "diff words.bak words.txt; echo diff-exit=$?\n"
wait 2
key ctrl+l
type "history | tail -n 5\n"
wait 15                       # coffee

type "tar cf project.tar words.txt reversed.txt digest.txt && tar tf project.tar\n"
wait 3
type "for f in *.txt; do echo \"$f: $(wc -c < $f) bytes\"; done\n"
wait 20                       # reading

scroll 250 420 up 5
wait 2
scroll 250 420 down 5
wait 10

# --- notes again, saved with the button
move 900 600
click 900 600
wait 0.5
key ctrl+End
type "Archived everything in project.tar.\n"
type "Next: measure how many pages differ after replay.\n"
wait 3
key shift+Up shift+Up         # select two lines...
wait 1
key ctrl+End                  # ...and drop the selection again, back at the end
type "(end of session)\n"
wait 2
click 560 14                  # Save button
wait 20                       # reading it back

# --- last shell round, then quiesce
move 300 500
click 300 500
wait 0.5
type "cat /root/notes.txt | tail -n 4\n"
wait 2
type "wc -l /root/notes.txt /root/project/*.txt\n"
wait 15
type "cd /root && sync\n"
wait 5
