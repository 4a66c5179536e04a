#!/usr/bin/env python3
"""translate.py - rewrite CUDA launch syntax for the host emulation.

    kernel<T, 1><<<grid, block, smem, stream>>>(a, b)
becomes
    emu::launch([=]() { kernel<T, 1>(a, b); }, grid, block, smem, stream)

Usage: translate.py IN.cu OUT.cc.  Everything else is copied unchanged;
#line directives keep compiler messages pointing at the original file.
"""
import re
import sys


def kernel_start(src, end):
    """Start index of the kernel expression that ends just before `end`
    (an identifier, optionally qualified, optionally with <template args>)."""
    i = end
    while True:
        if i > 0 and src[i - 1] == '>':          # template argument list
            depth, i = 0, i - 1
            while True:
                if src[i] == '>':
                    depth += 1
                elif src[i] == '<':
                    depth -= 1
                    if depth == 0:
                        break
                i -= 1
        while i > 0 and (src[i - 1].isalnum() or src[i - 1] in '_:'):
            i -= 1
        return i


def matching_paren(src, open_idx):
    depth = 0
    for j in range(open_idx, len(src)):
        if src[j] == '(':
            depth += 1
        elif src[j] == ')':
            depth -= 1
            if depth == 0:
                return j
    raise SystemExit('unbalanced parentheses after launch')


def translate(src):
    out = []
    pos = 0
    for m in re.finditer(r'<<<', src):
        if m.start() < pos:
            continue
        k0 = kernel_start(src, m.start())
        close = src.index('>>>', m.end())
        cfg = src[m.end():close]
        p0 = close + 3
        while src[p0].isspace():
            p0 += 1
        if src[p0] != '(':
            raise SystemExit('launch without argument list')
        p1 = matching_paren(src, p0)
        kernel = src[k0:m.start()]
        args = src[p0 + 1:p1]
        out.append(src[pos:k0])
        out.append('emu::launch([=]() { %s(%s); }, %s)' % (kernel, args, cfg))
        pos = p1 + 1
    out.append(src[pos:])
    return ''.join(out)


def main():
    src_path, dst_path = sys.argv[1], sys.argv[2]
    with open(src_path) as f:
        src = f.read()
    with open(dst_path, 'w') as f:
        f.write('#line 1 "%s"\n' % src_path)
        f.write(translate(src))


if __name__ == '__main__':
    main()
