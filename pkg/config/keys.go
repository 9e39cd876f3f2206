package config

import (
	"fmt"
	"maps"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"go.yaml.in/yaml/v3"
)

var (
	typeOfConfig   = reflect.TypeFor[Config]()
	typeOfDuration = reflect.TypeFor[Duration]()
)

// checkKeys walks the YAML document against the struct's yaml tags before it
// is decoded, so an unknown key or a value of the wrong type is reported with
// its full dotted path, its line, what the key takes and the value as
// written (the decoder's own errors cut the value off and name Go types).
// It records which key each line holds for any error the decoder still finds.
func checkKeys(n *yaml.Node, t reflect.Type, prefix string, lines map[int]string) *Error {
	if n.Kind != yaml.MappingNode {
		return &Error{Line: n.Line, Reason: "the file must be a mapping of keys"}
	}
	return checkNode(n, t, prefix, lines)
}

func checkNode(n *yaml.Node, t reflect.Type, path string, lines map[int]string) *Error {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null" {
		return nil // the decoder's business: an empty value zeroes the key
	}
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	wrong := func() *Error {
		return &Error{Line: n.Line, Key: path, Reason: fmt.Sprintf("want %s, got %s", describe(t), got(n, t))}
	}
	switch {
	case t == typeOfDuration:
		if n.Kind != yaml.ScalarNode || n.Decode(new(Duration)) != nil {
			return wrong()
		}
	case t.Kind() == reflect.Struct:
		if n.Kind != yaml.MappingNode {
			return wrong()
		}
		fields := yamlFields(t)
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := join(path, k.Value)
			ft, ok := fields[k.Value]
			if !ok {
				return &Error{Line: k.Line, Key: p, Reason: fmt.Sprintf("unknown key (known here: %s)", known(fields))}
			}
			lines[k.Line], lines[v.Line] = p, p
			if err := checkNode(v, ft, p, lines); err != nil {
				return err
			}
		}
	case t.Kind() == reflect.Map:
		if n.Kind != yaml.MappingNode {
			return wrong()
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := join(path, k.Value)
			lines[k.Line] = p
			if err := checkNode(v, t.Elem(), p, lines); err != nil {
				return err
			}
		}
	case t.Kind() == reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			return wrong()
		}
		for i, item := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			lines[item.Line] = p
			if err := checkNode(item, t.Elem(), p, lines); err != nil {
				return err
			}
		}
	default:
		if n.Kind != yaml.ScalarNode || n.Decode(reflect.New(t).Interface()) != nil || fractionForInt(n, t) {
			return wrong()
		}
	}
	return nil
}

// fractionForInt: the decoder truncates 1.5 into an int field; refuse it.
func fractionForInt(n *yaml.Node, t reflect.Type) bool {
	if k := kindOf(t); k != "int" && k != "uint" {
		return false
	}
	var f float64
	return n.ShortTag() == "!!float" && (n.Decode(&f) != nil || f != math.Trunc(f))
}

// kindOf sorts a config field's Go type into what the file writes.
func kindOf(t reflect.Type) string {
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == typeOfDuration {
		return "duration"
	}
	switch t.Kind() {
	case reflect.Bool:
		return "bool"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "int"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "uint"
	case reflect.Float32, reflect.Float64:
		return "float"
	case reflect.String:
		return "string"
	case reflect.Slice:
		return "list"
	default: // struct, map
		return "mapping"
	}
}

// what a key of each kind takes, and the plural for a list of them.
var kindWords = map[string][2]string{
	"duration": {`a duration like "5s" or "200ms"`, "durations"},
	"bool":     {"true or false", "true or false values"},
	"int":      {"a whole number", "whole numbers"},
	"uint":     {"a whole number, 0 or more", "whole numbers, 0 or more"},
	"float":    {"a number", "numbers"},
	"string":   {"a string", "strings"},
	"list":     {"a list", "lists"},
	"mapping":  {"a mapping of keys", "mappings"},
}

// describe says what a key of type t takes, in the file's terms.
func describe(t reflect.Type) string {
	if t.Kind() == reflect.Slice {
		return "a list of " + kindWords[kindOf(t.Elem())][1]
	}
	return kindWords[kindOf(t)][0]
}

// maxShown is how much of a bad value an error quotes; the rest is counted.
const maxShown = 200

// got shows the value a key was given: a scalar quoted in full (up to
// maxShown bytes), or the kind of a collection.
func got(n *yaml.Node, t reflect.Type) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	}
	v := n.Value
	s := ""
	if len(v) > maxShown {
		cut := maxShown
		for cut > 0 && !utf8.RuneStart(v[cut]) {
			cut--
		}
		s = strconv.Quote(v[:cut]) + fmt.Sprintf("…(%d bytes)", len(v))
	} else {
		s = strconv.Quote(v)
	}
	// "20" in quotes is a string to YAML, however much it looks like a number.
	if n.Style&(yaml.DoubleQuotedStyle|yaml.SingleQuotedStyle) != 0 && t.Kind() != reflect.String {
		plain := *n
		plain.Style, plain.Tag = 0, ""
		if plain.Decode(reflect.New(t).Interface()) == nil {
			s += " (in quotes, so a string: remove the quotes)"
		}
	}
	return s
}

func yamlFields(t reflect.Type) map[string]reflect.Type {
	fields := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name != "" && name != "-" {
			fields[name] = f.Type
		}
	}
	return fields
}

func join(prefix, key string) string {
	if prefix == "" {
		return key
	}
	return prefix + "." + key
}

func known(fields map[string]reflect.Type) string {
	return strings.Join(slices.Sorted(maps.Keys(fields)), ", ")
}
