# long.wl - a user's working session of over ten minutes, mostly typing: a small Python tool written
# in the shell with heredocs, run and fixed, notes kept in the notepad as the work goes. Run by
# `make bench-long` (not `make bench`: it alone takes longer than the rest of the suite).
# Screen 1280x800, no window manager: keyboard focus follows the pointer.
# xterm at +0+0 (84x56 chars, ~508x732 px); notepad at +520+0 (500x740, Save at its top-left,
# Clear next to it, text area below). Nothing printed depends on the time of day (no ls -l, no
# date), so both sides' screens can agree; waits are sized for a TCG guest. Ends saved and synced.

# --- the shell: a project folder and a first file
click 250 380
wait 1
type "mkdir -p /root/tally && cd /root/tally\n"
wait 1
type "cat > words.txt <<'EOF'\n"
type "the quick brown fox jumps over the lazy dog\n"
type "a migration that replays the user's input\n"
type "ships only the blocks that still differ\n"
type "and the target checks every root before it resumes\n"
type "EOF\n"
wait 1.5
type "wc -w words.txt\n"
wait 3
type "tr ' ' '\\n' < words.txt | sort | uniq -c | sort -rn | head -5\n"
wait 5

# --- notes about the plan
move 700 300
click 780 450
wait 1
key ctrl+End
type "\nTally project\n"
type "=============\n"
type "Goal: count the words of a text file and print the most common ones.\n"
type "Step 1: a words.txt with five lines (done).\n"
type "Step 2: a Python script that reads it and prints a table.\n"
wait 2
key ctrl+s
wait 6                        # the user thinks about the script

# --- the script, typed into a heredoc
move 300 300
click 250 380
wait 1
type "cat > tally.py <<'EOF'\n"
type "import sys\n"
type "from collections import Counter\n"
type "\n"
type "def words(path):\n"
type "    with open(path) as f:\n"
type "        for line in f:\n"
type "            yield from line.split()\n"
type "\n"
type "def main(argv):\n"
type "    counts = Counter(words(argv[1]))\n"
type "    for word, n in counts.most_common(int(argv[2])):\n"
type "        print(f'{n:4d} {word}')\n"
type "    return 0\n"
type "\n"
type "sys.exit(main(sys.argv))\n"
type "EOF\n"
wait 2
type "python3 tally.py words.txt 5\n"
wait 6                        # python starts slowly under TCG; the user reads the table

# --- a fix: the counts should ignore case; the user edits with sed, checks, reruns
type "sed -i 's/yield from line.split()/yield from line.lower().split()/' tally.py\n"
wait 2
type "grep -n lower tally.py\n"
wait 3
type "python3 tally.py words.txt 3\n"
wait 6

# --- notes: what the run showed
move 700 300
click 780 450
wait 1
key ctrl+End
type "Step 2 done: tally.py prints the most common words.\n"
type "It counts 'the' most often; case is ignored since the second version.\n"
type "Next: a larger input, generated, to see the script work on more lines.\n"
wait 2
key ctrl+s
wait 8

# --- a larger input and a check of the results
move 300 300
click 250 380
wait 1
type "for i in 1 2 3 4 5 6 7 8; do cat words.txt; done > more.txt\n"
wait 3
type "wc -l more.txt\n"
wait 3
type "python3 tally.py more.txt 4 > top.txt\n"
wait 6
type "cat top.txt\n"
wait 4
type "test \"$(head -1 top.txt | awk '{print $2}')\" = the && echo ok\n"
wait 5

# --- notes: a typo fixed by hand, then the summary
move 700 300
click 780 450
wait 1
key ctrl+End
type "Larger input: more.txt has forty lines; the top word is stil"
wait 1
key backspace*4
type "still 'the'.\n"
type "Summary\n"
type "-------\n"
type "words.txt   five lines of text\n"
type "tally.py    the word counter (case-insensitive)\n"
type "more.txt    eight copies of words.txt\n"
type "top.txt     the four most common words of more.txt\n"
wait 2
key ctrl+s
wait 10                       # the user reads the notes over

# --- a second feature: a minimum word length, typed as a new version of the script
move 300 300
click 250 380
wait 1
key ctrl+l
type "cp tally.py tally_v1.py\n"
wait 1
type "cat > tally.py <<'EOF'\n"
type "import sys\n"
type "from collections import Counter\n"
type "\n"
type "def words(path, shortest):\n"
type "    with open(path) as f:\n"
type "        for line in f:\n"
type "            for w in line.lower().split():\n"
type "                if len(w) >= shortest:\n"
type "                    yield w\n"
type "\n"
type "def main(argv):\n"
type "    shortest = int(argv[3]) if len(argv) > 3 else 1\n"
type "    counts = Counter(words(argv[1], shortest))\n"
type "    for word, n in counts.most_common(int(argv[2])):\n"
type "        print(f'{n:4d} {word}')\n"
type "    return 0\n"
type "\n"
type "sys.exit(main(sys.argv))\n"
type "EOF\n"
wait 2
type "python3 tally.py more.txt 5 4\n"
wait 6
type "diff <(python3 tally_v1.py more.txt 3) <(python3 tally.py more.txt 3) && echo same\n"
wait 8

# --- last notes, then everything saved and synced
move 700 300
click 780 450
wait 1
key ctrl+End
type "Step 3: tally.py takes a minimum word length as its third argument.\n"
type "With no third argument it prints what the first version printed.\n"
type "Done for today.\n"
wait 2
key ctrl+s
wait 3
move 300 300
click 250 380
wait 1
type "sha256sum words.txt more.txt top.txt tally.py tally_v1.py > SUMS\n"
wait 4
type "sync\n"
wait 4
