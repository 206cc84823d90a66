// A real Server-Sent Events client for tests/test_events_e2e.py: the
// eventsource package (what Node programs use), reconnecting on its own
// with Last-Event-ID. Prints one JSON line per event or state change.
//
//   node sse_client.js URL [--ca F --cert F --key F] TYPE...
'use strict'
const fs = require('fs')
const EventSource = require('eventsource')

const args = process.argv.slice(2)
const url = args.shift()
const options = { https: {} }
const types = []
while (args.length) {
  const arg = args.shift()
  if (arg === '--ca') options.https.ca = fs.readFileSync(args.shift())
  else if (arg === '--cert') options.https.cert = fs.readFileSync(args.shift())
  else if (arg === '--key') options.https.key = fs.readFileSync(args.shift())
  else types.push(arg)
}
options.https.rejectUnauthorized = true

function say (fields) {
  process.stdout.write(JSON.stringify(fields) + '\n')
}

const source = new EventSource(url, options)
source.onopen = () => say({ state: 'open' })
source.onerror = (e) => say({ state: 'error', status: e.status || null })
for (const type of types) {
  source.addEventListener(type, (e) => {
    say({ type: e.type, lastEventId: e.lastEventId, data: JSON.parse(e.data) })
  })
}
process.stdin.on('end', () => { source.close(); process.exit(0) })
process.stdin.resume()
