<#
.SYNOPSIS
    Installs the restic-manager agent on Windows (amd64).

.DESCRIPTION
    Downloads the agent the server serves for windows/amd64, verifies its SHA-256 (Get-FileHash) against the
    server's published SHA256SUMS, installs it under Program Files, enrolls it with the token and registers it to
    start at boot. Safe to re-run: an up-to-date binary is not downloaded again and an enrolled host is not enrolled
    twice. Run from an elevated PowerShell:

        & ([scriptblock]::Create((Invoke-WebRequest -UseBasicParsing https://SERVER/install/install.ps1).Content)) -Token TOKEN

    The server fills in the default of -Server when it serves this file; nothing else in it is rewritten, so the
    script can be reviewed and signed.
#>
[CmdletBinding()]
param(
    # restic-manager server URL (default: the server this script came from).
    [string]$Server = '__RM_SERVER_URL__',
    # Enrollment token; without it the agent is installed but not enrolled.
    [string]$Token = $env:RM_ENROLL_TOKEN,
    # Installation directory.
    [string]$InstallDir = (Join-Path $env:ProgramFiles 'restic-manager'),
    # Do not register the agent to start at boot.
    [switch]$NoService,
    # Print what would be done; change nothing.
    [switch]$DryRun
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'

function Write-Step([string]$Message) {
    Write-Host "restic-manager install: $Message"
}

function Install-ResticManagerAgent {
    if ($Server -like '__RM_SERVER*') {
        throw 'No server URL known: pass -Server https://YOUR-SERVER'
    }
    $base = $Server.TrimEnd('/')
    if ($base -notmatch '^https?://[A-Za-z0-9._~:/%@\[\]-]+$') {
        throw "Server URL must be http(s):// and contain only URL characters: $Server"
    }
    if ($env:PROCESSOR_ARCHITECTURE -ne 'AMD64') {
        throw "Unsupported architecture '$($env:PROCESSOR_ARCHITECTURE)'; supported on Windows: amd64"
    }
    $principal = New-Object Security.Principal.WindowsPrincipal([Security.Principal.WindowsIdentity]::GetCurrent())
    if (-not $DryRun -and -not $principal.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
        throw 'Installing into Program Files needs an elevated PowerShell (Run as administrator)'
    }

    $file = 'restic-manager-agent-windows-amd64.exe'
    $exe = Join-Path $InstallDir 'restic-manager-agent.exe'
    $configDir = Join-Path $env:ProgramData 'restic-manager'
    $config = Join-Path $configDir 'agent.json'

    $sums = (Invoke-WebRequest -UseBasicParsing -Uri "$base/agent/SHA256SUMS").Content
    if ($sums -is [byte[]]) { $sums = [Text.Encoding]::UTF8.GetString($sums) }
    $line = ($sums -split "`n") | Where-Object { $_ -match "^([0-9a-f]{64})  \*?$([regex]::Escape($file))\s*$" } | Select-Object -First 1
    if (-not $line) {
        throw "The server publishes no agent for windows/amd64 ($file is not in its SHA256SUMS)"
    }
    $expected = $Matches[1]

    if ((Test-Path $exe) -and ((Get-FileHash -Algorithm SHA256 $exe).Hash.ToLower() -eq $expected)) {
        Write-Step "$exe is already the served build ($expected)"
    } elseif ($DryRun) {
        Write-Step "would download $base/agent/binary?os=windows&arch=amd64, verify sha256 $expected, install $exe"
    } else {
        New-Item -ItemType Directory -Force -Path $InstallDir | Out-Null
        # The temporary file sits next to the destination so the final move is a rename on the same volume.
        $tmp = Join-Path $InstallDir ".restic-manager-agent.$([guid]::NewGuid().ToString('N')).exe"
        try {
            Write-Step "downloading the windows/amd64 agent from $base"
            Invoke-WebRequest -UseBasicParsing -Uri "$base/agent/binary?os=windows&arch=amd64" -OutFile $tmp
            $actual = (Get-FileHash -Algorithm SHA256 $tmp).Hash.ToLower()
            if ($actual -ne $expected) {
                throw "Checksum mismatch: expected $expected, got $actual; the existing agent (if any) is untouched"
            }
            $version = & $tmp --version
            if ($LASTEXITCODE -ne 0 -or "$version" -notlike 'restic-manager-agent version=*') {
                throw 'The downloaded file is not a working restic-manager agent; the existing agent (if any) is untouched'
            }
            Move-Item -Force -Path $tmp -Destination $exe
            Write-Step "installed $exe ($version)"
        } finally {
            if (Test-Path $tmp) { Remove-Item -Force $tmp }
        }
    }

    if (Test-Path $config) {
        Write-Step "already enrolled ($config exists); not enrolling again"
    } elseif (-not $Token) {
        Write-Step "no -Token given: the agent is installed but not enrolled"
        Write-Step "enroll later with: & '$exe' enroll --server $base --token TOKEN --config '$config'"
    } elseif ($DryRun) {
        Write-Step "would enroll with $base"
    } else {
        & $exe enroll --server $base --token $Token --config $config
        if ($LASTEXITCODE -ne 0) { throw 'Enrollment failed (see the message above)' }
    }

    if ($NoService) {
        Write-Step "not registering a service (-NoService); run: & '$exe' run --config '$config'"
        return
    }
    # The agent is a console program: a scheduled task running as SYSTEM at boot, restarted on failure, runs it
    # without a Windows service wrapper.
    $taskName = 'restic-manager-agent'
    if ($DryRun) {
        Write-Step "would register and start the scheduled task $taskName"
        return
    }
    $action = New-ScheduledTaskAction -Execute $exe -Argument "run --config `"$config`""
    $trigger = New-ScheduledTaskTrigger -AtStartup
    $principalTask = New-ScheduledTaskPrincipal -UserId 'SYSTEM' -LogonType ServiceAccount -RunLevel Highest
    $settings = New-ScheduledTaskSettingsSet -RestartCount 999 -RestartInterval (New-TimeSpan -Minutes 1) `
        -ExecutionTimeLimit ([TimeSpan]::Zero) -StartWhenAvailable
    Register-ScheduledTask -TaskName $taskName -Action $action -Trigger $trigger -Principal $principalTask `
        -Settings $settings -Force | Out-Null
    Start-ScheduledTask -TaskName $taskName
    Write-Step "scheduled task $taskName registered and started"
}

Install-ResticManagerAgent
