// Command runner runs a sequence of go commands inside one build container, so that a
// build needs one container per phase instead of one per command. Written by
// caddy-build-server and compiled with the builder image itself.
//
// Usage: runner NONCE JSON, where JSON is a list of argument lists for the go command.
// Each command's stdout and stderr go, in order, to stdout; before and after each command
// the runner prints a marker line "@@cbs NONCE start I" / "@@cbs NONCE exit I CODE".
// It stops after the first command that fails.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Println("usage: runner NONCE JSON")
		os.Exit(2)
	}
	nonce := os.Args[1]
	var commands [][]string
	if err := json.Unmarshal([]byte(os.Args[2]), &commands); err != nil {
		fmt.Println("runner: bad command list:", err)
		os.Exit(2)
	}
	for i, args := range commands {
		fmt.Printf("@@cbs %s start %d\n", nonce, i)
		code := run(args)
		fmt.Printf("@@cbs %s exit %d %d\n", nonce, i, code)
		if code != 0 {
			return
		}
	}
}

// run runs one go command, copying its output and ending it with a newline.
func run(args []string) int {
	r, w, err := os.Pipe()
	if err != nil {
		fmt.Println("runner:", err)
		return 125
	}
	cmd := exec.Command("go", args...)
	cmd.Stdout = w
	cmd.Stderr = w
	if err := cmd.Start(); err != nil {
		w.Close()
		r.Close()
		fmt.Println("runner: cannot start go:", err)
		return 127
	}
	w.Close()
	last := byte('\n')
	buf := make([]byte, 32*1024)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			os.Stdout.Write(buf[:n])
			last = buf[n-1]
		}
		if err == io.EOF || err != nil {
			break
		}
	}
	r.Close()
	if last != '\n' {
		os.Stdout.Write([]byte("\n"))
	}
	if err := cmd.Wait(); err != nil {
		if exit, ok := err.(*exec.ExitError); ok {
			return exit.ExitCode()
		}
		return 126
	}
	return 0
}
