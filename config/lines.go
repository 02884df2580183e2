package config

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
)

// keyPath names a node of the document: keys, plus element indexes for
// arrays, so "the vip of the second [[service]]" is distinct from the first.
type keyPath []string

func (p keyPath) key(name string) keyPath { return append(p[:len(p):len(p)], "."+name) }
func (p keyPath) index(i int) keyPath     { return append(p[:len(p):len(p)], "#"+strconv.Itoa(i)) }
func (p keyPath) String() string          { return strings.Join(p, "\x00") }

// lineIndex maps keyPath.String() to the 1-based line a node is defined on.
//
// go-toml reports positions only for syntax errors: a document decoded into maps
// carries none, and we check values after decoding. Hence this small scanner. It only has to understand what
// the real parser already accepted; anything it cannot place falls back to the
// enclosing node (see line).
type lineIndex map[string]int

// line returns the line of p, or of its nearest ancestor the index knows, or 0.
func (ix lineIndex) line(p keyPath) int {
	for ; len(p) > 0; p = p[:len(p)-1] {
		if l, ok := ix[p.String()]; ok {
			return l
		}
	}
	return 0
}

// lineOf points at the other party of a conflict, when it came from a file.
func (ix lineIndex) lineOf(at keyPath) string {
	if l := ix.line(at); l > 0 {
		return fmt.Sprintf(" (line %d)", l)
	}
	return ""
}

// positions is a document's line index, built the first time a line is asked for: only
// problems need lines, and indexing every key of a 100k-service file cost as much as
// decoding it (most of a reload that changes nothing). A nil *positions knows no lines.
type positions struct {
	src []byte
	ix  lineIndex
}

func newPositions(src []byte) *positions { return &positions{src: src} }

func (p *positions) index() lineIndex {
	if p == nil {
		return nil
	}
	if p.ix == nil {
		p.ix = indexLines(p.src)
		p.src = nil
	}
	return p.ix
}

func (p *positions) line(at keyPath) int      { return p.index().line(at) }
func (p *positions) lineOf(at keyPath) string { return p.index().lineOf(at) }

// maxDepth bounds the paths indexed. podsock's own keys are at most six
// levels deep (service, index, allow, index, labels, key); deeper keys are
// unknown anyway and are reported at an indexed ancestor. Without a bound a
// key like a.a.a...a would cost time and memory quadratic in its length.
const maxDepth = 16

func indexLines(src []byte) lineIndex {
	src = bytes.TrimPrefix(src, []byte("\uFEFF")) // a BOM would hide the first header
	s := &lineScanner{src: src, line: 1, ix: lineIndex{}, tables: map[string]int{}}
	for !s.eof() {
		start := s.pos
		s.skipSpace()
		if s.eof() {
			break
		}
		switch s.peek() {
		case '\n':
			s.newline()
		case '#':
			s.skipComment()
		case '[':
			s.header()
		default:
			s.keyValue()
		}
		if s.pos == start { // never stall on input it does not understand
			s.pos++
		}
	}
	return s.ix
}

type lineScanner struct {
	src  []byte
	pos  int
	line int
	ix   lineIndex

	table  keyPath        // the table keys currently go into
	deep   bool           // table is nested beyond maxDepth, keys are not indexed
	tables map[string]int // element count of each array of tables seen so far
}

func (s *lineScanner) eof() bool  { return s.pos >= len(s.src) }
func (s *lineScanner) peek() byte { return s.src[s.pos] }

func (s *lineScanner) newline() { s.pos++; s.line++ }

func (s *lineScanner) skipSpace() {
	for !s.eof() && (s.peek() == ' ' || s.peek() == '\t' || s.peek() == '\r') {
		s.pos++
	}
}

func (s *lineScanner) skipComment() {
	for !s.eof() && s.peek() != '\n' {
		s.pos++
	}
}

func (s *lineScanner) record(p keyPath, line int) {
	if len(p) == 0 {
		return
	}
	// The first definition wins: a later "[a]" after "[a.b]" defines nothing new.
	if _, ok := s.ix[p.String()]; !ok {
		s.ix[p.String()] = line
	}
}

// header handles "[a.b]" and "[[a.b]]".
func (s *lineScanner) header() {
	line := s.line
	s.pos++
	array := !s.eof() && s.peek() == '['
	if array {
		s.pos++
	}
	names := s.dottedKey()
	s.skipComment() // closing brackets and any trailing comment

	s.table, s.deep = nil, len(names) > maxDepth
	if s.deep {
		return
	}
	var p keyPath
	for i, name := range names {
		p = p.key(name)
		k := p.String()
		if array && i == len(names)-1 {
			s.tables[k]++
		}
		// Parents, and the array itself, are located where first mentioned.
		s.record(p, line)
		// A table nested in an array of tables belongs to its latest element.
		if n, ok := s.tables[k]; ok {
			p = p.index(n - 1)
		}
	}
	s.table = p
	s.record(p, line)
}

func (s *lineScanner) keyValue() {
	line := s.line
	names := s.dottedKey()
	s.skipSpace()
	if len(names) == 0 || s.eof() || s.peek() != '=' {
		s.skipComment()
		return
	}
	s.pos++
	if s.deep || len(s.table)+len(names) > maxDepth {
		s.value(nil) // still skipped, for the line count
		return
	}
	p := s.table
	for _, name := range names {
		p = p.key(name)
		s.record(p, line) // dotted keys define their parents too
	}
	s.value(p)
}

func (s *lineScanner) dottedKey() []string {
	var names []string
	for {
		s.skipSpace()
		if s.eof() {
			return names
		}
		switch c := s.peek(); {
		case c == '"' || c == '\'':
			start := s.pos
			s.skipString()
			names = append(names, unquoteKey(string(s.src[start:s.pos])))
		case isBareKeyByte(c):
			start := s.pos
			for !s.eof() && isBareKeyByte(s.peek()) {
				s.pos++
			}
			names = append(names, string(s.src[start:s.pos]))
		default:
			return names
		}
		s.skipSpace()
		if s.eof() || s.peek() != '.' {
			return names
		}
		s.pos++
	}
}

// isBareKeyByte also accepts non-ASCII bytes, which newer TOML allows in bare
// keys; being generous here costs nothing since the parser already ruled.
func isBareKeyByte(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '_' || c == '-' || c >= 0x80
}

func unquoteKey(q string) string {
	if q[0] == '"' {
		// TOML escapes are close enough to Go's; on the rare miss the key just
		// won't be found and the error falls back to its table's line.
		if u, err := strconv.Unquote(q); err == nil {
			return u
		}
	}
	body := q[1:]
	if n := len(body); n > 0 && body[n-1] == q[0] {
		body = body[:n-1]
	}
	return body
}

// value skips the value of key p, recording the line each element of a
// top-level array starts on, so "the third backend" gets its own line when
// the array spans several. A nil p records nothing.
func (s *lineScanner) value(p keyPath) {
	var open []byte // unclosed brackets and braces
	elem := 0
	wantElem := false
	for !s.eof() {
		c := s.peek()
		inArray := len(open) == 1 && open[0] == '['
		if inArray && wantElem && c != ' ' && c != '\t' && c != '\r' && c != '\n' &&
			c != '#' && c != ',' && c != ']' {
			s.record(p.index(elem), s.line)
			elem++
			wantElem = false
		}
		switch c {
		case '\n':
			if len(open) == 0 {
				return
			}
			s.newline()
		case '#':
			s.skipComment()
		case '"', '\'':
			s.skipString()
		case '[', '{':
			open = append(open, c)
			wantElem = len(open) == 1 && c == '['
			s.pos++
		case ']', '}':
			if len(open) > 0 {
				open = open[:len(open)-1]
			}
			s.pos++
		case ',':
			if inArray {
				wantElem = true
			}
			s.pos++
		default:
			s.pos++
		}
	}
}

// skipString skips a basic, literal or multi-line string starting at pos,
// counting the newlines inside it.
func (s *lineScanner) skipString() {
	q := s.peek()
	if s.triple(q) {
		s.pos += 3
		for !s.eof() {
			switch c := s.peek(); {
			case c == '\\' && q == '"':
				s.pos++
				if !s.eof() {
					if s.peek() == '\n' {
						s.line++
					}
					s.pos++
				}
			case c == q && s.triple(q):
				s.pos += 3
				// Up to two more quotes are content right before the delimiter.
				for i := 0; i < 2 && !s.eof() && s.peek() == q; i++ {
					s.pos++
				}
				return
			case c == '\n':
				s.newline()
			default:
				s.pos++
			}
		}
		return
	}
	s.pos++
	for !s.eof() {
		switch c := s.peek(); {
		case c == '\n':
			return // unterminated; leave the newline to the caller
		case c == '\\' && q == '"':
			s.pos++
			if !s.eof() && s.peek() != '\n' {
				s.pos++
			}
		case c == q:
			s.pos++
			return
		default:
			s.pos++
		}
	}
}

func (s *lineScanner) triple(q byte) bool {
	return s.pos+2 < len(s.src) && s.src[s.pos+1] == q && s.src[s.pos+2] == q
}
