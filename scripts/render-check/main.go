// Command render-check parses rendered files with the parsers that will
// read them and prints each one's structure as one JSON line, so that a test
// can compare a file rendered from an odd value with one rendered from a
// plain value: same structure, or the value changed the file's meaning.
//
//	render-check corefile -directives reload,bind,... FILE...   (CoreDNS's own caddyfile parser)
//	render-check shell FILE...                                  (bash, as mvdan.cc/sh parses it)
//
// Each line is {"file": ..., "error": ..., "shape": [...]}; "error" is set
// when the parser refuses the file. The shape keeps what decides meaning
// (server blocks, directives, token count, braces and lines; shell nodes and
// the expansions inside each word) and drops literal text.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"

	"github.com/coredns/caddy/caddyfile"
	"mvdan.cc/sh/v3/syntax"
)

type result struct {
	File  string   `json:"file"`
	Error string   `json:"error,omitempty"`
	Shape []string `json:"shape"`
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: render-check corefile|shell [flags] FILE...")
		os.Exit(2)
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	directives := flags.String("directives", "", "comma-separated CoreDNS directives")
	_ = flags.Parse(os.Args[2:])
	check := map[string]func(string) ([]string, error){
		"corefile": func(path string) ([]string, error) {
			return corefile(path, strings.Split(*directives, ","))
		},
		"shell": shell,
	}[os.Args[1]]
	if check == nil {
		fmt.Fprintf(os.Stderr, "render-check: unknown kind %q\n", os.Args[1])
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, path := range flags.Args() {
		shape, err := check(path)
		r := result{File: path, Shape: shape}
		if err != nil {
			r.Error = err.Error()
		}
		if err := out.Encode(r); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
	}
}

func corefile(path string, directives []string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	blocks, err := caddyfile.Parse(path, f, directives)
	if err != nil {
		return nil, err
	}
	var shape []string
	for _, block := range blocks {
		shape = append(shape, fmt.Sprintf("block keys=%d", len(block.Keys)))
		names := make([]string, 0, len(block.Tokens))
		for name := range block.Tokens {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			var tokens []string
			for _, t := range block.Tokens[name] {
				text := "w"
				if t.Text == "{" || t.Text == "}" {
					text = t.Text
				}
				tokens = append(tokens, fmt.Sprintf("%d:%s", t.Line, text))
			}
			shape = append(shape, name+" "+strings.Join(tokens, " "))
		}
	}
	return shape, nil
}

func shell(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	file, err := syntax.NewParser(syntax.Variant(syntax.LangBash)).Parse(f, path)
	if err != nil {
		return nil, err
	}
	var shape []string
	syntax.Walk(file, func(node syntax.Node) bool {
		if node == nil {
			return true
		}
		if word, ok := node.(*syntax.Word); ok {
			shape = append(shape, "word("+wordShape(word)+")")
			return false
		}
		shape = append(shape, reflect.TypeOf(node).Elem().Name())
		return true
	})
	return shape, nil
}

// wordShape is a word's expansions; quoted and plain text are all "lit".
func wordShape(word *syntax.Word) string {
	var parts []string
	syntax.Walk(word, func(node syntax.Node) bool {
		switch node.(type) {
		case nil, *syntax.Word:
		case *syntax.Lit, *syntax.SglQuoted, *syntax.DblQuoted:
			if len(parts) == 0 || parts[len(parts)-1] != "lit" {
				parts = append(parts, "lit")
			}
		default:
			parts = append(parts, reflect.TypeOf(node).Elem().Name())
		}
		return true
	})
	return strings.Join(parts, " ")
}
