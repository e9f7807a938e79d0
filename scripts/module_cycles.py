#!/usr/bin/env python3
"""Reports import cycles in the daemon's source (ztunnel/src): between its top-level modules,
and between the files inside each of its module directories.

An edge A -> B is a `crate::B::…` or `super::…` path written in A, grouped imports
(`use crate::{a, b::c}`) included; an edge to a directory's own mod.rs is not counted among
its files. Cycles are the strongly connected groups, each shown with its two-way pairs and
the files that make each edge.

Usage: scripts/module_cycles.py [SRC_DIR] [--no-tests] [--edges]
  --no-tests  leave out test code: `#[cfg(test)] mod … { }` blocks and files named tests.rs,
              *_tests.rs or under a tests/ directory
  --edges     also list every edge between top-level modules
Reads the files as text and only reports; it always exits 0."""
import os, re, sys, itertools
args = [a for a in sys.argv[1:] if not a.startswith('--')]
root = args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'ztunnel', 'src')
skip_tests = '--no-tests' in sys.argv
SUBDIRS = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))

def modpath(rel):
    parts = rel[:-3].split('/')
    if parts[-1] in ('mod', 'lib', 'main'): parts = parts[:-1]
    return parts

def strip_test_mods(src):
    # drop `#[cfg(test)] mod x { ... }` blocks and `#[cfg(test)]` single items up to `;`
    out, i = [], 0
    for m in re.finditer(r'#\[cfg\(test\)\]\s*(pub(\(\w+\))?\s+)?mod\s+\w+\s*\{', src):
        if m.start() < i: continue
        out.append(src[i:m.start()])
        depth, j = 1, m.end()
        while depth and j < len(src):
            if src[j] == '{': depth += 1
            elif src[j] == '}': depth -= 1
            j += 1
        i = j
    out.append(src[i:])
    src = ''.join(out)
    return re.sub(r'#\[cfg\(test\)\][^;{]*;', '', src)

def strip_comments(src):
    src = re.sub(r'/\*.*?\*/', '', src, flags=re.S)
    src = '\n'.join(re.sub(r'//.*', '', l) for l in src.split('\n'))
    return strip_test_mods(src) if skip_tests else src

def expand_group(prefix, body):
    # body: contents of {...}, may be nested; returns list of full paths
    out, depth, cur = [], 0, ''
    for ch in body:
        if ch == '{': depth += 1
        if ch == '}': depth -= 1
        if ch == ',' and depth == 0:
            out.append(cur.strip()); cur = ''
        else: cur += ch
    if cur.strip(): out.append(cur.strip())
    res = []
    for item in out:
        m = re.match(r'([\w:]*?)::\{(.*)\}$', item, re.S)
        if m: res += expand_group(prefix + [p for p in m.group(1).split('::') if p], m.group(2))
        elif item.startswith('{') and item.endswith('}'): res += expand_group(prefix, item[1:-1])
        else: res.append(prefix + [p for p in item.split(' as ')[0].strip().split('::') if p])
    return res

def paths(src):
    found = []
    for m in re.finditer(r'\b(crate|super)((?:::\w+)*)::\{', src):
        start = m.end(); depth = 1; i = start
        while depth:
            if src[i] == '{': depth += 1
            elif src[i] == '}': depth -= 1
            i += 1
        found += expand_group([m.group(1)] + [p for p in m.group(2).split('::') if p], src[start:i-1])
    for m in re.finditer(r'\b((?:super::)+|crate::)(\w+(?:::\w+)*)', src):
        found.append([p for p in m.group(1).split('::') if p] + m.group(2).split('::'))
    return found

files = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if f.endswith('.rs'):
            rel = os.path.relpath(os.path.join(d, f), root)
            if skip_tests and (f == 'tests.rs' or f.endswith('_tests.rs') or '/tests/' in '/'+rel): continue
            files[rel] = modpath(rel)
mods = {tuple(v): k for k, v in files.items()}

def resolve(me, p):
    # me: module path of the file; p: path list starting with crate/super
    cur = list(me)
    out = []
    i = 0
    if p[0] == 'crate': i = 1; cur = []
    else:
        while i < len(p) and p[i] == 'super': cur = cur[:-1]; i += 1
    out = cur + [x for x in p[i:] if x not in ('self',)]
    return out

def longest_file(target):
    for n in range(len(target), 0, -1):
        if tuple(target[:n]) in mods: return mods[tuple(target[:n])]
    return None

top, inner = {}, {}
for rel, me in files.items():
    src = strip_comments(open(os.path.join(root, rel)).read())
    for p in paths(src):
        t = resolve(me, p)
        if not t: continue
        t = [{'refused': 'refusal', 'warn_throttled': 'throttle'}.get(t[0], t[0])] + t[1:]
        if me and t[0] != me[0]:
            top.setdefault(me[0], {}).setdefault(t[0], set()).add(rel)
        if me and len(me) >= 1 and me[0] in SUBDIRS and t[0] == me[0]:
            f = longest_file(t)
            if f and f != rel and files[f] != me[:1]:  # ignore edges to the dir's mod.rs
                inner.setdefault(rel, {}).setdefault(f, set()).add(rel)

def sccs(graph):
    idx, low, st, on, res, c = {}, {}, [], set(), [], [0]
    nodes = set(graph) | {t for v in graph.values() for t in v}
    def visit(v):
        idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
        for w in graph.get(v, {}):
            if w not in idx: visit(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], idx[w])
        if low[v] == idx[v]:
            comp = []
            while True:
                w = st.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: res.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in sorted(nodes):
        if v not in idx: visit(v)
    return res

def report(name, graph):
    comps = sccs(graph)
    print(f'== {name}: {len(comps)} cyclic group(s)')
    for comp in comps:
        print('  group:', ', '.join(comp))
        for a, b in itertools.permutations(comp, 2):
            if b in graph.get(a, {}) and a in graph.get(b, {}) and a < b:
                print(f'    {a} <-> {b}')
                print(f'       {a} -> {b} in: ' + ', '.join(sorted(graph[a][b])))
                print(f'       {b} -> {a} in: ' + ', '.join(sorted(graph[b][a])))
        if len(comp) > 2:
            for a in comp:
                for b in comp:
                    if b in graph.get(a, {}) and not (a in graph.get(b, {})):
                        print(f'    {a} -> {b}  ({", ".join(sorted(graph[a][b]))})')

if '--edges' in sys.argv:
    for a in sorted(top):
        for b in sorted(top[a]): print(f'  {a} -> {b}: ' + ', '.join(sorted(top[a][b])))
report('top-level modules', top)
for d in SUBDIRS:
    g = {a: v for a, v in inner.items() if a.startswith(d + '/')}
    report(f'files in {d}/', g)
