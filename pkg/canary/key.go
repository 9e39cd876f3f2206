package canary

import (
	"fmt"
	"strings"
)

// SourceKind says where a sticky key is read from.
type SourceKind uint8

const (
	FromHeader SourceKind = iota + 1
	FromCookie
)

// Source is one entry of the ordered sticky_keys list.
type Source struct {
	Kind SourceKind
	Name string // lower-case header name, or cookie name as written
}

// String returns the config form, e.g. "header:x-user-id".
func (s Source) String() string {
	if s.Kind == FromCookie {
		return "cookie:" + s.Name
	}
	return "header:" + s.Name
}

// ParseSource parses "header:NAME" or "cookie:NAME".
func ParseSource(s string) (Source, error) {
	kind, name, ok := strings.Cut(s, ":")
	if !ok || name == "" {
		return Source{}, fmt.Errorf("%q: want \"header:NAME\" or \"cookie:NAME\"", s)
	}
	switch kind {
	case "header":
		if strings.HasPrefix(strings.ToLower(name), "x-knhk-") {
			return Source{}, fmt.Errorf("%q: x-knhk-* headers are stripped from clients and cannot be sticky keys", s)
		}
		if !validToken(name) {
			return Source{}, fmt.Errorf("%q: %q is not a valid header name", s, name)
		}
		return Source{Kind: FromHeader, Name: strings.ToLower(name)}, nil
	case "cookie":
		if !validToken(name) {
			return Source{}, fmt.Errorf("%q: %q is not a valid cookie name", s, name)
		}
		return Source{Kind: FromCookie, Name: name}, nil
	default:
		return Source{}, fmt.Errorf("%q: unknown source %q, want header or cookie", s, kind)
	}
}

// validToken reports whether s is an RFC 9110 token (header and cookie names).
func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// Headers looks up a request header by lower-case name. It is a type
// parameter constraint, so callers' header views are not boxed per request.
type Headers interface {
	Get(name string) (string, bool)
}

// StickyKey returns the first non-empty key among sources, in order.
func StickyKey[H Headers](sources []Source, h H) (string, bool) {
	for _, src := range sources {
		switch src.Kind {
		case FromHeader:
			if v, ok := h.Get(src.Name); ok && v != "" {
				return v, true
			}
		case FromCookie:
			if h, ok := h.Get("cookie"); ok {
				if v, ok := CookieValue(h, src.Name); ok && v != "" {
					return v, true
				}
			}
		}
	}
	return "", false
}

// CookieValue finds a cookie in a Cookie header value ("a=1; b=2") without
// allocating. Surrounding double quotes are removed from the value.
func CookieValue(header, name string) (string, bool) {
	for header != "" {
		var part string
		part, header, _ = strings.Cut(header, ";")
		part = strings.TrimSpace(part)
		k, v, ok := strings.Cut(part, "=")
		if !ok || strings.TrimSpace(k) != name {
			continue
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			v = v[1 : len(v)-1]
		}
		return v, true
	}
	return "", false
}
