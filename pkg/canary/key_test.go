package canary

import "testing"

func TestParseSource(t *testing.T) {
	good := map[string]Source{
		"header:X-User-Id":    {FromHeader, "x-user-id"},
		"cookie:knhk-session": {FromCookie, "knhk-session"},
	}
	for in, want := range good {
		got, err := ParseSource(in)
		if err != nil || got != want {
			t.Errorf("ParseSource(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"", "header:", "x-user-id", "query:id", "header:bad name", "header:x-knhk-version"} {
		if _, err := ParseSource(in); err == nil {
			t.Errorf("ParseSource(%q) accepted", in)
		}
	}
}

func TestStickyKeyOrder(t *testing.T) {
	srcs := []Source{{FromHeader, "x-user-id"}, {FromCookie, "knhk-session"}, {FromHeader, "x-request-id"}}
	cases := []struct {
		h    map[string]string
		want string
		ok   bool
	}{
		{map[string]string{"x-user-id": "u1", "cookie": "knhk-session=s1", "x-request-id": "r1"}, "u1", true},
		{map[string]string{"x-user-id": "", "cookie": "a=b; knhk-session=\"s1\"", "x-request-id": "r1"}, "s1", true},
		{map[string]string{"cookie": "knhk-sessionx=s1", "x-request-id": "r1"}, "r1", true},
		{map[string]string{"accept": "*/*"}, "", false},
	}
	for _, c := range cases {
		got, ok := StickyKey(srcs, mapHeaders(c.h))
		if got != c.want || ok != c.ok {
			t.Errorf("headers %v: got %q,%v want %q,%v", c.h, got, ok, c.want, c.ok)
		}
	}
}

func FuzzCookieValue(f *testing.F) {
	f.Add("a=1; knhk-session=abc", "knhk-session")
	f.Add(";;=;\"", "")
	f.Fuzz(func(t *testing.T, h, name string) {
		v, ok := CookieValue(h, name)
		if !ok && v != "" {
			t.Fatal("value without match")
		}
	})
}

type mapHeaders map[string]string

func (m mapHeaders) Get(n string) (string, bool) { v, ok := m[n]; return v, ok }
