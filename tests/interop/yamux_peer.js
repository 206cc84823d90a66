// A yamux peer built on yamux-js, for tests/test_yamux_interop.py.
//
// Listens on 127.0.0.1, port 0, and prints {"port": N} on stdout. Every TCP
// connection it accepts gets its own yamux-js session (Server with
// --role server, Client with --role client). Log lines go to stderr.
//
// Each stream the test opens starts with one JSON line saying what to do:
//   {"op": "echo", "size": N}  echo the next N bytes, then FIN (close()).
//   {"op": "sink", "size": N}  FIN at once, read N bytes, then open a new
//        stream to the test and write a report line on it:
//        {"op": "report", "of": id, "bytes": N, "sha256": hex}.
//   {"op": "open", "count": C, "size": N}  open C streams to the test, send
//        N pseudo-random bytes on each, FIN, expect them echoed back, and
//        answer on this stream one line per stream
//        {"op": "result", "stream": id, "sent": hex, "echoed": hex,
//         "bytes": N} then {"op": "done"} and FIN.
//   {"op": "goaway"}  end the session: Go Away (normal), then close.
//
// yamux-js 0.2.0 decodes a frame only when the whole frame is inside one
// chunk read from the socket: the part of a frame that a read splits off is
// dropped and the next header is read from the middle of a payload. Unless
// --raw is given, a small reframer sits between the socket and yamux-js and
// hands it exactly one whole frame per chunk; everything else (streams,
// windows, flags, Ping, Go Away) is yamux-js's own.

'use strict';

const crypto = require('crypto');
const net = require('net');
const path = require('path');
const {Transform} = require('stream');

const {Client, Server} = require(path.join(__dirname, 'node_modules', 'yamux-js'));

const HEADER = 12;
const TYPE_DATA = 0;

function parseArgs(argv) {
    const args = {role: 'server', raw: false, keepalive: 0, writeTimeout: 10};
    for (let i = 0; i < argv.length; i++) {
        const a = argv[i];
        if (a === '--role') args.role = argv[++i];
        else if (a === '--raw') args.raw = true;
        else if (a === '--keepalive') args.keepalive = Number(argv[++i]);
        else if (a === '--write-timeout') args.writeTimeout = Number(argv[++i]);
        else throw new Error(`unknown argument ${a}`);
    }
    if (args.role !== 'server' && args.role !== 'client') {
        throw new Error(`--role must be server or client, not ${args.role}`);
    }
    return args;
}

function log(...parts) {
    process.stderr.write(`[yamux_peer] ${parts.join(' ')}\n`);
}

// Hands on the byte stream as whole yamux frames, one frame per chunk.
class Reframer extends Transform {
    constructor() {
        super({readableObjectMode: true});
        this.buf = Buffer.alloc(0);
    }

    _transform(chunk, _encoding, cb) {
        this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
        while (this.buf.length >= HEADER) {
            const type = this.buf.readUInt8(1);
            const length = type === TYPE_DATA ? this.buf.readUInt32BE(8) : 0;
            if (this.buf.length < HEADER + length) break;
            this.push(this.buf.subarray(0, HEADER + length));
            this.buf = this.buf.subarray(HEADER + length);
        }
        cb();
    }
}

// Deterministic pseudo-random bytes: SHA-256 in counter mode.
function pattern(seed, size) {
    const blocks = [];
    for (let i = 0; i * 32 < size; i++) {
        blocks.push(crypto.createHash('sha256').update(`${seed}:${i}`).digest());
    }
    return Buffer.concat(blocks).subarray(0, size);
}

function sha256(buf) {
    return crypto.createHash('sha256').update(buf).digest('hex');
}

// FIN after everything written so far. yamux-js's close() sends FIN at
// once, ahead of writes still queued in the Writable (for instance waiting
// for send window), so wait for 'finish' first.
function finish(stream) {
    stream.once('finish', () => stream.close());
    stream.end();
}

function line(stream, obj) {
    stream.write(JSON.stringify(obj) + '\n');
}

// Calls onCommand(cmd, rest) once the stream's first line is in, then
// onData(chunk) for everything after it.
function readCommand(stream, onCommand) {
    let head = Buffer.alloc(0);
    let handler = null;
    stream.on('data', (chunk) => {
        if (handler) return handler(chunk);
        head = Buffer.concat([head, chunk]);
        const nl = head.indexOf(10);
        if (nl < 0) return;
        const cmd = JSON.parse(head.subarray(0, nl).toString('utf8'));
        const rest = head.subarray(nl + 1);
        handler = onCommand(cmd) || (() => {});
        if (rest.length) handler(rest);
    });
}

function serveStream(session, stream) {
    stream.on('error', (err) => log(`stream ${stream.ID()} error:`, err.message));
    readCommand(stream, (cmd) => {
        log(`stream ${stream.ID()}:`, JSON.stringify(cmd));
        switch (cmd.op) {
            case 'echo': {
                let left = cmd.size;
                if (left === 0) finish(stream);
                return (chunk) => {
                    stream.write(chunk);
                    left -= chunk.length;
                    if (left === 0) finish(stream);
                };
            }
            case 'sink': {
                finish(stream);
                const hash = crypto.createHash('sha256');
                let got = 0;
                const report = () => {
                    const out = session.open();
                    out.on('error', (err) => log('report stream error:', err.message));
                    line(out, {op: 'report', of: stream.ID(), bytes: got, sha256: hash.digest('hex')});
                    finish(out);
                };
                if (cmd.size === 0) report();
                return (chunk) => {
                    hash.update(chunk);
                    got += chunk.length;
                    if (got >= cmd.size) report();
                };
            }
            case 'open':
                openStreams(session, stream, cmd);
                return null;
            case 'goaway':
                session.close();
                return null;
            default:
                log(`unknown op ${cmd.op}`);
                finish(stream);
                return null;
        }
    });
}

function openStreams(session, control, cmd) {
    let pending = cmd.count;
    for (let i = 0; i < cmd.count; i++) {
        const out = session.open();
        const sent = pattern(`${out.ID()}`, cmd.size);
        const chunks = [];
        let got = 0;
        let reported = false;
        out.on('error', (err) => log(`stream ${out.ID()} error:`, err.message));
        out.on('data', (chunk) => {
            chunks.push(chunk);
            got += chunk.length;
            if (got >= cmd.size && !reported) {
                reported = true;
                const echoed = Buffer.concat(chunks);
                line(control, {
                    op: 'result',
                    stream: out.ID(),
                    bytes: echoed.length,
                    sent: sha256(sent),
                    echoed: sha256(echoed),
                });
                if (--pending === 0) {
                    line(control, {op: 'done'});
                    finish(control);
                }
            }
        });
        // Several writes, so the send window runs out part way.
        for (let off = 0; off < sent.length; off += 100000) {
            out.write(sent.subarray(off, off + 100000));
        }
        finish(out);
    }
}

function main() {
    const args = parseArgs(process.argv.slice(2));
    const config = {
        enableKeepAlive: args.keepalive > 0,
        keepAliveInterval: args.keepalive > 0 ? args.keepalive : 30,
        connectionWriteTimeout: args.writeTimeout,
        logger: (...parts) => log('yamux-js:', ...parts),
    };
    const server = net.createServer((socket) => {
        log(`connection from ${socket.remoteAddress}:${socket.remotePort}`);
        let session;
        const onStream = (stream) => serveStream(session, stream);
        if (args.role === 'server') {
            session = new Server(onStream, config);
        } else {
            // yamux-js's Client takes no stream callback; set the one its
            // Session uses for streams the peer opens.
            session = new Client(config);
            session.onStream = onStream;
        }
        session.on('error', (err) => log('session error:', err.message));
        socket.on('error', (err) => log('socket error:', err.message));
        socket.on('close', () => {
            log('connection closed');
            session.close();
        });
        const input = args.raw ? socket : socket.pipe(new Reframer());
        input.pipe(session).pipe(socket);
    });
    server.listen(0, '127.0.0.1', () => {
        process.stdout.write(JSON.stringify({port: server.address().port}) + '\n');
    });
}

main();
