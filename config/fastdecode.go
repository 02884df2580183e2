package config

import (
	"bytes"
	"strconv"
	"unicode/utf8"
)

// fastDecode decodes the plain subset of TOML that generated configs are written in, into
// the document toml.Decode would give: bare-key [table] and [[array]] headers, bare
// `key = value` lines whose value is a basic string without escapes, a decimal integer, a
// boolean, or a one-line array of such strings and integers; blank and comment lines.
// Anything else, and anything the real parser might reject (a key or table defined twice),
// makes it give up (ok false): the caller then runs the real parser, so a file decodes the
// same either way. It exists because the TOML library took 1.4 s for a 100k-service file,
// most of a reload that changes one service.
func fastDecode(data []byte) (doc map[string]any, ok bool) {
	root := map[string]any{}
	cur := root
	headers := map[string]bool{} // [table]s defined, each at most once
	for len(data) > 0 {
		var line []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			// A carriage return is part of a line ending only before a newline.
			line, data = bytes.TrimSuffix(data[:i], []byte("\r")), data[i+1:]
		} else {
			line, data = data, nil
		}
		line = trimSpace(line)
		if len(line) == 0 {
			continue
		}
		switch line[0] {
		case '#':
			if !plainText(line[1:]) {
				return nil, false
			}
		case '[':
			if len(line) > 4 && line[1] == '[' && line[len(line)-1] == ']' && line[len(line)-2] == ']' {
				name := line[2 : len(line)-2]
				if !bareKey(name) {
					return nil, false
				}
				var arr []map[string]any
				if v, exists := root[string(name)]; exists {
					if arr, ok = v.([]map[string]any); !ok {
						return nil, false
					}
				}
				cur = map[string]any{}
				root[string(name)] = append(arr, cur)
				continue
			}
			if len(line) < 3 || line[len(line)-1] != ']' {
				return nil, false
			}
			name := line[1 : len(line)-1]
			if !bareKey(name) || headers[string(name)] {
				return nil, false
			}
			if _, exists := root[string(name)]; exists {
				return nil, false
			}
			headers[string(name)] = true
			cur = map[string]any{}
			root[string(name)] = cur
		default:
			eq := bytes.IndexByte(line, '=')
			if eq < 0 {
				return nil, false
			}
			key := trimSpace(line[:eq])
			if !bareKey(key) {
				return nil, false
			}
			if _, dup := cur[string(key)]; dup {
				return nil, false
			}
			v, ok := fastValue(trimSpace(line[eq+1:]))
			if !ok {
				return nil, false
			}
			cur[string(key)] = v
		}
	}
	return root, true
}

// fastValue decodes one value of fastDecode's subset, all of s.
func fastValue(s []byte) (any, bool) {
	if len(s) == 0 {
		return nil, false
	}
	switch s[0] {
	case '"':
		str, rest, ok := fastString(s)
		return str, ok && len(rest) == 0
	case '[':
		var out []any
		s = trimSpace(s[1:])
		for len(s) > 0 && s[0] != ']' {
			var v any
			if s[0] == '"' {
				str, rest, ok := fastString(s)
				if !ok {
					return nil, false
				}
				v, s = str, rest
			} else {
				end := bytes.IndexAny(s, ",]")
				if end < 0 {
					return nil, false
				}
				n, ok := fastInt(trimSpace(s[:end]))
				if !ok {
					return nil, false
				}
				v, s = n, s[end:]
			}
			out = append(out, v)
			s = trimSpace(s)
			if len(s) > 0 && s[0] == ',' {
				s = trimSpace(s[1:])
			} else if len(s) == 0 || s[0] != ']' {
				return nil, false
			}
		}
		// An empty array decodes to a non-nil empty slice, which the decoder reads apart
		// from a missing key: left to the real parser.
		if len(s) != 1 || len(out) == 0 {
			return nil, false
		}
		return out, true
	}
	switch string(s) {
	case "true":
		return true, true
	case "false":
		return false, true
	}
	n, ok := fastInt(s)
	return n, ok
}

// fastString decodes a basic string with no escapes at the start of s.
func fastString(s []byte) (string, []byte, bool) {
	end := bytes.IndexByte(s[1:], '"')
	if end < 0 {
		return "", nil, false
	}
	body := s[1 : 1+end]
	if bytes.IndexByte(body, '\\') >= 0 || !plainText(body) {
		return "", nil, false
	}
	return string(body), s[2+end:], true
}

// fastInt decodes a decimal integer as TOML writes it plainly: no sign but '-', no
// leading zero, no underscores.
func fastInt(s []byte) (int64, bool) {
	digits := s
	if len(digits) > 0 && digits[0] == '-' {
		digits = digits[1:]
	}
	if len(digits) == 0 || (digits[0] == '0' && len(s) > 1) {
		return 0, false
	}
	for _, c := range digits {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(string(s), 10, 64)
	return n, err == nil
}

func bareKey(s []byte) bool {
	if len(s) == 0 {
		return false
	}
	for _, c := range s {
		// ASCII only: the line scanner's isBareKeyByte is lenient on purpose.
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// plainText is valid UTF-8 without the control characters TOML forbids in strings and
// comments (tab is allowed).
func plainText(s []byte) bool {
	for _, c := range s {
		if (c < 0x20 && c != '\t') || c == 0x7f {
			return false
		}
	}
	return utf8.Valid(s)
}

func trimSpace(s []byte) []byte {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}
