#!/usr/bin/env python3
"""Build a plain-text (UTF-8) English prose corpus from Debian packages only.

Usage:  python3 make_corpus.py OUTDIR [--sources austen,webbible,handbook]
                                      [--workdir /tmp/corpus_search]

Sources (all fetched with `apt-get download` + `dpkg-deb -x` into WORKDIR;
nothing is installed system-wide; needs `apt-get update` to have been run):
  austen    r-cran-janeaustenr  Jane Austen's 6 novels (public-domain text,
                                package MIT). Read from R's lazy-load DB with
                                the pure-Python R-serialization reader below.
  webbible  sword-text-web      World English Bible (public domain, modern
                                English), one file per book, OSIS markup,
                                Strong's tags and footnotes stripped.
  handbook  debian-handbook     The Debian Administrator's Handbook, en-US
                                HTML -> text (GPL-2+ or CC-BY-SA-3.0);
                                <pre> blocks (commands/code), TOCs, nav dropped.
Only the Python standard library is used.
"""

import argparse
import bz2
import glob
import gzip
import html
import html.parser
import lzma
import os
import re
import struct
import subprocess
import zlib

# --------------------------------------------------------------- apt helpers


def fetch_deb(pkg, workdir):
    """apt-get download PKG into WORKDIR/deb and extract to WORKDIR/x/PKG."""
    debdir = os.path.join(workdir, "deb")
    dest = os.path.join(workdir, "x", pkg)
    if os.path.isdir(dest) and os.listdir(dest):
        return dest
    os.makedirs(debdir, exist_ok=True)
    if not glob.glob(os.path.join(debdir, pkg + "_*.deb")):
        subprocess.run(["apt-get", "download", pkg], cwd=debdir, check=True)
    deb = sorted(glob.glob(os.path.join(debdir, pkg + "_*.deb")))[-1]
    os.makedirs(dest, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", deb, dest], check=True)
    return dest


# ------------------------------------------ minimal R unserialize (XDR, v2/v3)


class _RReader:
    def __init__(self, data):
        self.d, self.p, self.refs = data, 0, []

    def int(self):
        v = struct.unpack_from(">i", self.d, self.p)[0]
        self.p += 4
        return v

    def take(self, n):
        b = self.d[self.p : self.p + n]
        self.p += n
        return b

    def length(self):
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) + lo
        return n

    def header(self):
        assert self.take(2) == b"X\n", "not XDR R serialization"
        version = self.int()
        self.int()
        self.int()
        if version == 3:
            self.take(self.int())

    def item(self):
        flags = self.int()
        t = flags & 0xFF
        has_attr, has_tag = bool(flags & 512), bool(flags & 1024)
        if t in (254, 242, 251, 253):
            return None
        if t == 255:  # REFSXP
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == 1:  # SYMSXP
            name = self.item()
            self.refs.append(name)
            return name
        if t == 9:  # CHARSXP
            n = self.int()
            return None if n == -1 else self.take(n).decode("utf-8", "replace")
        if t in (2, 6, 17):  # pairlists
            out = []
            while True:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out.append((tag, self.item()))
                flags = self.int()
                t2 = flags & 0xFF
                if t2 == 254:
                    break
                if t2 not in (2, 6, 17):
                    self.p -= 4
                    out.append((None, self.item()))
                    break
                has_attr, has_tag = bool(flags & 512), bool(flags & 1024)
            return ("pairlist", out)
        if t == 4:  # ENVSXP
            self.int()
            env = {}
            self.refs.append(env)
            for _ in range(4):
                self.item()
            return env
        if t == 238:  # ALTREP
            info, state, _ = self.item(), self.item(), self.item()
            return ("altrep", info, state)
        if t in (16, 19, 20):  # STRSXP, VECSXP, EXPRSXP
            v = [self.item() for _ in range(self.length())]
        elif t in (10, 13):
            n = self.length()
            v = list(struct.unpack_from(f">{n}i", self.d, self.p))
            self.p += 4 * n
        elif t == 14:
            n = self.length()
            v = list(struct.unpack_from(f">{n}d", self.d, self.p))
            self.p += 8 * n
        elif t == 24:
            v = self.take(self.length())
        else:
            raise ValueError(f"unsupported SEXP type {t}")
        attrs = self.item() if has_attr else None
        return ("vec", t, v, attrs)


def r_unserialize(data):
    r = _RReader(data)
    r.header()
    return r.item()


def _r_chunk(buf):
    n = struct.unpack(">I", buf[:4])[0]
    kind = buf[4:5]
    if kind == b"Z":
        out = lzma.decompress(buf[5:])
    elif kind == b"2":
        out = bz2.decompress(buf[5:])
    elif kind == b"0":
        out = buf[5:]
    else:
        out = zlib.decompress(buf[4:])
    assert len(out) == n
    return out


def r_lazyload(rdx, rdb):
    raw = open(rdx, "rb").read()
    try:
        raw = gzip.decompress(raw)
    except OSError:
        raw = _r_chunk(raw)
    _, _, comps, attrs = r_unserialize(raw)
    names = next(v for k, v in attrs[1] if k == "names")[2]
    variables = comps[names.index("variables")]
    var_names = next(v for k, v in variables[3][1] if k == "names")[2]
    data = open(rdb, "rb").read()
    out = {}
    for name, pos in zip(var_names, variables[2]):
        start, length = (int(x) for x in pos[2])
        out[name] = r_unserialize(_r_chunk(data[start : start + length]))
    return out


# ------------------------------------------------------------------ sources

AUSTEN_TITLES = {
    "prideprejudice": "pride_and_prejudice",
    "sensesensibility": "sense_and_sensibility",
    "emma": "emma",
    "mansfieldpark": "mansfield_park",
    "northangerabbey": "northanger_abbey",
    "persuasion": "persuasion",
}


def src_austen(workdir, out):
    root = fetch_deb("r-cran-janeaustenr", workdir)
    d = glob.glob(os.path.join(root, "usr/lib/R/site-library/janeaustenr/data"))[0]
    objs = r_lazyload(os.path.join(d, "Rdata.rdx"), os.path.join(d, "Rdata.rdb"))
    files = []
    for name, obj in sorted(objs.items()):
        if not (isinstance(obj, tuple) and obj[0] == "vec" and obj[1] == 16):
            continue
        lines = [line if line is not None else "" for line in obj[2]]
        text = "\n".join(lines).strip() + "\n"
        fn = os.path.join(out, f"austen_{AUSTEN_TITLES.get(name, name)}.txt")
        write(fn, text)
        files.append(fn)
    return files


def _osis_to_text(s):
    s = re.sub(r"<note\b[^>]*?/>", "", s)
    s = re.sub(r"<note\b.*?</note>", "\x00", s, flags=re.S)  # footnotes
    s = re.sub(r"<milestone\b[^>]*>", "", s)
    s = re.sub(r"<title\b[^>]*>", "\n\n", s)
    s = re.sub(r"</title>", "\n\n", s)
    s = re.sub(r"<chapter\b[^>]*sID[^>]*>", "\n\n", s)
    s = re.sub(r"<div\b[^>]*eID[^>]*type=\"x-p\"[^>]*/>", "\n\n", s)
    s = re.sub(r"<div\b[^>]*type=\"x-p\"[^>]*eID[^>]*/>", "\n\n", s)
    s = re.sub(r"</l>|<l\b[^>]*eID[^>]*/>|<lb\b[^>]*/>", "\n", s)
    s = re.sub(r"</lg>|<lg\b[^>]*eID[^>]*/>", "\n\n", s)
    s = re.sub(r"<[^>]+>", "", s)
    # a footnote often sat between two words with no space left around it
    s = re.sub(r"(\w)\x00+(?=\w)", r"\1 ", s).replace("\x00", "")
    s = html.unescape(s)
    paras = []
    for p in re.split(r"\n\s*\n", s):
        lines = [re.sub(r"[ \t]+", " ", line).strip() for line in p.split("\n")]
        p = "\n".join(line for line in lines if line)
        if p:
            paras.append(p)
    return "\n\n".join(paras) + "\n"


# a book starts at <div type="book" sID=..> (or, where osis2mod lost that div,
# at its first <chapter sID="Book.N">); end markers (eID) are ignored
BOOK_START = re.compile(
    r'(<div\b(?=[^>]*\bsID=)(?=[^>]*type="book")[^>]*>'
    r"|<chapter\b(?=[^>]*\bsID=)[^>]*>)"
)
# Greek Esther/Daniel repeat the Hebrew-based books almost verbatim: skip them.
WEB_SKIP = {"EsthGr", "DanGr"}


def src_webbible(workdir, out):
    """Walk the zText verse index (.bzv: u32 block, u32 offset, u16 size per
    entry, in canonical order) so that stale/duplicate data in .bzz is skipped;
    start a new file at every <div type="book" osisID=...>."""
    root = fetch_deb("sword-text-web", workdir)
    mod = glob.glob(os.path.join(root, "usr/share/sword/modules/texts/ztext/*"))[0]
    books = []  # [name, [osis chunks]]
    for t in ("ot", "nt"):
        bzs = open(os.path.join(mod, t + ".bzs"), "rb").read()
        bzz = open(os.path.join(mod, t + ".bzz"), "rb").read()
        bzv = open(os.path.join(mod, t + ".bzv"), "rb").read()
        cache, seen = {}, set()
        for i in range(len(bzv) // 10):
            blk, off, size = struct.unpack_from("<IIH", bzv, i * 10)
            if not size or (blk, off, size) in seen:
                continue
            seen.add((blk, off, size))
            if blk not in cache:
                boff, bsize, _ = struct.unpack_from("<III", bzs, blk * 12)
                cache = {blk: zlib.decompress(bzz[boff : boff + bsize])}
            entry = cache[blk][off : off + size].decode("utf-8")
            parts = BOOK_START.split(entry)
            if not books:
                books.append(["Preface", []])
            books[-1][1].append(parts[0])
            for j in range(1, len(parts), 2):
                name = re.search(r'osisID="([^".]+)', parts[j]).group(1)
                if books[-1][0] != name:
                    books.append([name, []])
                books[-1][1].append(parts[j] + parts[j + 1])
    files = []
    for n, (name, chunks) in enumerate(books, 1):
        if name in WEB_SKIP:
            continue
        text = _osis_to_text(" ".join(chunks))
        if len(text) < 200:
            continue
        fn = os.path.join(out, f"webbible_{n:03d}_{name}.txt")
        write(fn, text)
        files.append(fn)
    return files


class _HTMLText(html.parser.HTMLParser):
    BLOCK = {
        "p",
        "div",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "li",
        "dt",
        "dd",
        "tr",
        "br",
        "table",
        "ul",
        "ol",
        "dl",
        "blockquote",
        "title",
    }
    SKIP = {"head", "script", "style", "pre"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.stack = [], []  # stack of (tag, skipping?)

    def _skipping(self):
        return any(s for _, s in self.stack)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = a.get("class") or ""
        skip = (
            tag in self.SKIP
            or (tag == "div" and ("toc" in cls.split() or a.get("id") == "banner" or "index" in cls.split()))
            or (tag == "ul" and "docnav" in cls)
            or (tag == "p" and a.get("id") == "title")
        )
        if tag in ("br", "img", "meta", "link", "hr", "input"):
            if tag == "br":
                self.parts.append("\n")
            return
        self.stack.append((tag, skip))
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._skipping():
            self.parts.append(data)

    def text(self):
        s = "".join(self.parts)
        paras = []
        for p in re.split(r"\n\s*\n", s):
            p = re.sub(r"\s+", " ", p).strip()
            # captions of the (dropped) <pre> examples
            if p and not re.match(r"Example \d+\.\d+\. ", p):
                paras.append(p)
        return "\n\n".join(paras) + "\n"


def html_to_text(path):
    p = _HTMLText()
    p.feed(open(path, encoding="utf-8", errors="replace").read())
    p.close()
    return p.text()


def src_handbook(workdir, out):
    root = fetch_deb("debian-handbook", workdir)
    d = os.path.join(root, "usr/share/doc/debian-handbook/html/en-US")
    files = []
    for path in sorted(glob.glob(os.path.join(d, "*.html"))):
        base = os.path.basename(path)[:-5]
        if base in ("index",):
            continue
        text = html_to_text(path)
        if len(text) < 500:
            continue
        fn = os.path.join(out, f"handbook_{base}.txt")
        write(fn, text)
        files.append(fn)
    return files


def write(fn, text):
    with open(fn, "w", encoding="utf-8") as f:
        f.write(text)


SOURCES = {"austen": src_austen, "webbible": src_webbible, "handbook": src_handbook}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--sources", default="austen,webbible,handbook")
    ap.add_argument("--workdir", default="/tmp/corpus_search")
    a = ap.parse_args()
    os.makedirs(a.outdir, exist_ok=True)
    total_files = total_bytes = 0
    for s in a.sources.split(","):
        files = SOURCES[s](a.workdir, a.outdir)
        b = sum(os.path.getsize(f) for f in files)
        print(f"{s:<9} {len(files):4d} files {b:10d} bytes")
        total_files += len(files)
        total_bytes += b
    print(f"TOTAL     {total_files:4d} files {total_bytes:10d} bytes -> {a.outdir}")


if __name__ == "__main__":
    main()
