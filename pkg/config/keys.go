package config

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

var typeOfConfig = reflect.TypeFor[Config]()

// checkKeys walks the YAML mapping against the struct's yaml tags so an
// unknown or misspelt key is reported with its full dotted path and line,
// and records which key each line holds for later type errors.
func checkKeys(n *yaml.Node, t reflect.Type, prefix string, lines map[int]string) *Error {
	if n.Kind != yaml.MappingNode {
		if prefix == "" {
			return &Error{Line: n.Line, Reason: "the file must be a mapping of keys"}
		}
		return nil // type mismatch is reported by the decoder, with the key from lines
	}
	fields := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
		if name != "" && name != "-" {
			fields[name] = f.Type
		}
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		path := k.Value
		if prefix != "" {
			path = prefix + "." + k.Value
		}
		ft, ok := fields[k.Value]
		if !ok {
			return &Error{Line: k.Line, Key: path, Reason: fmt.Sprintf("unknown key (known here: %s)", known(fields))}
		}
		lines[k.Line] = path
		lines[v.Line] = path
		if ft.Kind() == reflect.Struct {
			if err := checkKeys(v, ft, path, lines); err != nil {
				return err
			}
		}
		if ft.Kind() == reflect.Map && v.Kind == yaml.MappingNode {
			for j := 0; j+1 < len(v.Content); j += 2 {
				ek, ev := v.Content[j], v.Content[j+1]
				lines[ek.Line] = path + "." + ek.Value
				if ft.Elem().Kind() == reflect.Struct {
					if err := checkKeys(ev, ft.Elem(), path+"."+ek.Value, lines); err != nil {
						return err
					}
				}
			}
		}
		if ft.Kind() == reflect.Slice && v.Kind == yaml.SequenceNode {
			for j, item := range v.Content {
				lines[item.Line] = fmt.Sprintf("%s[%d]", path, j)
				if ft.Elem().Kind() == reflect.Struct {
					if err := checkKeys(item, ft.Elem(), fmt.Sprintf("%s[%d]", path, j), lines); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

func known(fields map[string]reflect.Type) string {
	return strings.Join(slices.Sorted(maps.Keys(fields)), ", ")
}
