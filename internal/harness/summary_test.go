package harness

import (
	"strings"
	"testing"
)

func TestSummaryCollapsesRepeatsAndKeepsTheTail(t *testing.T) {
	var b LogBuffer
	_, _ = b.Write([]byte("start 1\n"))
	for i := range 500 {
		_, _ = b.Write([]byte("[12:00:0" + string(rune('0'+i%10)) + "] overflow on stream 77" + string(rune('0'+i%10)) + "\n"))
	}
	_, _ = b.Write([]byte("draining\nstopped\n"))
	got := b.Summary(10)
	want := "start 1\n[12:00:00] overflow on stream 770\n        … and 499 more lines like it\ndraining\nstopped"
	if got != want {
		t.Fatalf("Summary:\n%s\nwant:\n%s", got, want)
	}
	if s := b.Summary(2); !strings.HasPrefix(s, "… 501 earlier lines left out\n") || !strings.HasSuffix(s, "draining\nstopped") {
		t.Fatalf("Summary(2) = %q", s)
	}
}
