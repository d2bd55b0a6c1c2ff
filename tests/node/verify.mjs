// Verifies an activation token the way a course platform would, with another language and another
// JOSE library than the service (jose, on Node): the JWKS of GetSigningKeys, EdDSA only, the
// platform as audience, the service's issuer, the token type. Prints the payload as JSON.
//
// Usage: node tests/node/verify.mjs --jwks JWKS.json --token TOKEN_FILE --audience PLATFORM \
//          --issuer ISSUER [--now UNIX_SECONDS]
// --now checks the validity period at that instant (the tests' server lives on a fixed clock).
// Exit codes: 0 verified, 1 refused (the jose error code on stderr), 2 usage.
import { readFileSync } from 'node:fs'
import { parseArgs } from 'node:util'
import { createLocalJWKSet, jwtVerify } from 'jose'

const TOKEN_TYPE = 'entitlement-activation+jwt'

let values
try {
  ;({ values } = parseArgs({
    options: {
      jwks: { type: 'string' },
      token: { type: 'string' },
      audience: { type: 'string' },
      issuer: { type: 'string' },
      now: { type: 'string' },
    },
    strict: true,
  }))
} catch (err) {
  console.error(`verify.mjs: ${err.message}`)
  process.exit(2)
}
for (const name of ['jwks', 'token', 'audience', 'issuer']) {
  if (!values[name]) {
    console.error(`verify.mjs: --${name} is required`)
    process.exit(2)
  }
}
if (values.now !== undefined && !/^\d+$/.test(values.now)) {
  console.error('verify.mjs: --now must be a Unix time in seconds')
  process.exit(2)
}

try {
  const jwks = createLocalJWKSet(JSON.parse(readFileSync(values.jwks, 'utf8')))
  const token = readFileSync(values.token, 'utf8').trim()
  const { payload } = await jwtVerify(token, jwks, {
    algorithms: ['EdDSA'],
    audience: values.audience,
    issuer: values.issuer,
    typ: TOKEN_TYPE,
    requiredClaims: ['sub', 'exp', 'nbf', 'iat', 'jti', 'program', 'entitlement'],
    ...(values.now !== undefined ? { currentDate: new Date(Number(values.now) * 1000) } : {}),
  })
  console.log(JSON.stringify(payload))
} catch (err) {
  console.error(`verify.mjs: token refused: ${err.code ?? 'ERROR'}: ${err.message}`)
  process.exit(1)
}
