// Command runner runs a sequence of go commands inside one build container, so that a
// build needs one container per phase instead of one per command. Written by
// caddy-build-server and compiled with the builder image itself.
//
// Usage: runner NONCE TIMEOUT_MS JSON, where JSON is a list of argument lists for the go
// command. Each command's stdout and stderr go, in order, to stdout; before and after each
// command the runner prints a marker line "@@cbs NONCE start I" / "@@cbs NONCE exit I CODE".
// Each command gets TIMEOUT_MS milliseconds: then it is killed with its whole process group
// and its exit code is -2 (no process exits with a negative code). The runner stops after the first command that fails.
//
// With two more arguments, LISTEN SOCKET (resolve containers, which have no network), the
// runner first listens on the TCP address LISTEN (the container's own loopback) and
// carries every connection to the Unix socket SOCKET: the worker's module-proxy gate, the
// only thing a resolve step can reach.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"
)

// exitTimedOut is the exit code of a command the runner stopped at its time limit.
const exitTimedOut = -2

func main() {
	if len(os.Args) == 3 && os.Args[1] == "cacheprog" {
		os.Exit(cacheprog(os.Args[2]))
	}
	if len(os.Args) != 4 && len(os.Args) != 6 {
		fmt.Println("usage: runner NONCE TIMEOUT_MS JSON [LISTEN SOCKET]")
		os.Exit(2)
	}
	if len(os.Args) == 6 {
		if err := gate(os.Args[4], os.Args[5]); err != nil {
			fmt.Println("runner: cannot open the way to the module proxy:", err)
			os.Exit(2)
		}
	}
	nonce := os.Args[1]
	ms, err := strconv.ParseInt(os.Args[2], 10, 64)
	if err != nil || ms <= 0 {
		fmt.Println("runner: bad timeout:", os.Args[2])
		os.Exit(2)
	}
	timeout := time.Duration(ms) * time.Millisecond
	var commands [][]string
	if err := json.Unmarshal([]byte(os.Args[3]), &commands); err != nil {
		fmt.Println("runner: bad command list:", err)
		os.Exit(2)
	}
	for i, args := range commands {
		fmt.Printf("@@cbs %s start %d\n", nonce, i)
		code := run(args, timeout)
		fmt.Printf("@@cbs %s exit %d %d\n", nonce, i, code)
		if code != 0 {
			return
		}
	}
}

// run runs one go command, copying its output and ending it with a newline; after
// timeout it kills the command's process group.
func run(args []string, timeout time.Duration) int {
	r, w, err := os.Pipe()
	if err != nil {
		fmt.Println("runner:", err)
		return 125
	}
	cmd := exec.Command("go", args...)
	cmd.Stdout = w
	cmd.Stderr = w
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		r.Close()
		fmt.Println("runner: cannot start go:", err)
		return 127
	}
	w.Close()
	var timedOut atomic.Bool
	timer := time.AfterFunc(timeout, func() {
		timedOut.Store(true)
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	})
	defer timer.Stop()
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
	err = cmd.Wait()
	if timedOut.Load() {
		fmt.Printf("runner: stopped after the time limit of %s\n", timeout)
		return exitTimedOut
	}
	if err != nil {
		if exit, ok := err.(*exec.ExitError); ok {
			return exit.ExitCode()
		}
		return 126
	}
	return 0
}

// gate listens on listen and copies each connection to and from the Unix socket socket.
func gate(listen, socket string) error {
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				u, err := net.Dial("unix", socket)
				if err != nil {
					return
				}
				defer u.Close()
				done := make(chan struct{}, 2)
				go func() { io.Copy(u, c); u.(*net.UnixConn).CloseWrite(); done <- struct{}{} }()
				go func() { io.Copy(c, u); c.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
				<-done
				<-done
			}()
		}
	}()
	return nil
}

// cacheprog copies stdin to the Unix socket socket and what comes back to stdout, until
// the worker closes its end (after the go command's "close").
func cacheprog(socket string) int {
	u, err := net.Dial("unix", socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "runner: cannot reach the build cache:", err)
		return 1
	}
	go func() {
		io.Copy(u, os.Stdin)
		u.(*net.UnixConn).CloseWrite()
	}()
	if _, err := io.Copy(os.Stdout, u); err != nil {
		fmt.Fprintln(os.Stderr, "runner: build cache:", err)
		return 1
	}
	return 0
}
