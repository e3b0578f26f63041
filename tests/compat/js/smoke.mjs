// Smoke test of the official E2B JS SDK (e2b@2.45.0) against a Corral server.
//
// Run by tests/compat/test_js_sdk.py with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set. Exits
// non-zero on the first failed check; the last stdout line is a JSON summary for the caller
// (`watch` says whether directory watching worked, so the caller can decide if it must).
import assert from 'node:assert/strict'
import { CommandExitError, Sandbox } from 'e2b'

const summary = { steps: [] }
const step = (name) => summary.steps.push(name)

async function waitFor(predicate, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs
  while (!predicate()) {
    if (Date.now() > deadline) return false
    await new Promise((resolve) => setTimeout(resolve, 25))
  }
  return true
}

const sbx = await Sandbox.create({ timeoutMs: 60_000, envs: { FROM_CREATE: 'js' } })
step('create')
try {
  const result = await sbx.commands.run('echo hello $FROM_CREATE; echo err >&2; whoami')
  assert.deepEqual([result.stdout, result.stderr, result.exitCode], ['hello js\nuser\n', 'err\n', 0])
  const chunks = []
  await sbx.commands.run('echo a; sleep 0.3; echo b', { onStdout: (data) => chunks.push(data) })
  assert.deepEqual(chunks, ['a\n', 'b\n'])
  await assert.rejects(sbx.commands.run('echo partial; exit 3'), (err) => {
    assert.ok(err instanceof CommandExitError)
    assert.deepEqual([err.exitCode, err.stdout, err.error], [3, 'partial\n', 'exit status 3'])
    return true
  })
  assert.equal((await sbx.commands.run('whoami', { user: 'root', cwd: '/tmp' })).stdout, 'root\n')
  step('run')

  const cat = await sbx.commands.run('cat', { background: true, stdin: true })
  await sbx.commands.sendStdin(cat.pid, 'via stdin\n')
  await sbx.commands.closeStdin(cat.pid)
  assert.equal((await cat.wait()).stdout, 'via stdin\n')
  const sleeper = await sbx.commands.run('sleep 100', { background: true })
  assert.ok((await sbx.commands.list()).some((p) => p.pid === sleeper.pid))
  assert.equal(await sbx.commands.kill(sleeper.pid), true)
  await assert.rejects(sleeper.wait(), (err) => err.exitCode === -1 && err.error === 'signal: killed')
  assert.equal(await sbx.commands.kill(sleeper.pid), false)
  step('background')

  let screen = ''
  const terminal = await sbx.pty.create({ cols: 80, rows: 24, onData: (data) => { screen += new TextDecoder().decode(data) } })
  await sbx.pty.sendInput(terminal.pid, new TextEncoder().encode('echo $TERM $((6*7)); exit\n'))
  assert.equal((await terminal.wait()).exitCode, 0)
  assert.ok(screen.includes('xterm-256color 42'), screen)
  step('pty')

  await sbx.files.write('/home/user/js.txt', 'from js')
  assert.equal(await sbx.files.read('/home/user/js.txt'), 'from js')
  assert.equal((await sbx.commands.run('cat /home/user/js.txt')).stdout, 'from js')
  step('files')

  try {
    await sbx.files.makeDir('/home/user/watched')
    const events = []
    const watcher = await sbx.files.watchDir('/home/user/watched', (event) => events.push(event))
    await sbx.files.write('/home/user/watched/new.txt', 'x')
    const seen = await waitFor(() => events.some((e) => e.name === 'new.txt'))
    await watcher.stop()
    summary.watch = seen ? 'ok' : 'no events'
  } catch (err) {
    summary.watch = `failed: ${err}`
  }
  step('watch')
} finally {
  await sbx.kill()
}
assert.equal(await sbx.isRunning(), false)
step('kill')
console.log(JSON.stringify(summary))
