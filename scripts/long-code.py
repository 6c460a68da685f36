#!/usr/bin/env python3
"""Lists .rs files over 600 lines and functions over 80 lines (the STYLE limits), outside
target/: `python3 scripts/long-code.py [DIR]`. Brace matching with strings and comments
skipped roughly; good enough to find candidates, not a parser."""
import os, re, sys
root = sys.argv[1] if len(sys.argv) > 1 else '.'
FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"[^"]*"\s+)?fn\s+(\w+)')
def strip(line, state):
    # remove string literals and // comments (approx); state tracks block comment
    out = []; i = 0; n = len(line)
    while i < n:
        if state['block']:
            j = line.find('*/', i)
            if j < 0: return ''.join(out)
            state['block'] = False; i = j + 2; continue
        c = line[i]
        if line.startswith('//', i): break
        if line.startswith('/*', i): state['block'] = True; i += 2; continue
        if c == '"':
            j = i + 1
            while j < n and line[j] != '"':
                j += 2 if line[j] == '\\' else 1
            i = j + 1; continue
        if c == "'" and i + 2 < n and (line[i+2] == "'" or (line[i+1] == '\\')):
            j = line.find("'", i + 2 if line[i+1] != '\\' else i + 3)
            i = (j + 1) if j >= 0 else n; continue
        out.append(c); i += 1
    return ''.join(out)
for dp, dns, fns in os.walk(root):
    dns[:] = [d for d in dns if d not in ('target', '.git')]
    for f in fns:
        if not f.endswith('.rs'): continue
        p = os.path.join(dp, f)
        lines = open(p, encoding='utf-8', errors='replace').read().split('\n')
        if len(lines) - 1 > 600: print(f'FILE {len(lines)-1:5d} {p}')
        state = {'block': False}; stack = []; depth = 0; pending = None
        for no, line in enumerate(lines, 1):
            m = FN.match(line) if not state['block'] else None
            s = strip(line, state)
            if m and pending is None: pending = (m.group(7), no)
            for ch in s:
                if ch == '{':
                    depth += 1
                    if pending: stack.append((pending[0], pending[1], depth)); pending = None
                elif ch == '}':
                    if stack and stack[-1][2] == depth:
                        name, start, _ = stack.pop()
                        ln = no - start + 1
                        if ln > 80: print(f'FN   {ln:5d} {p}:{start} {name}')
                    depth -= 1
                elif ch == ';' and pending: pending = None
