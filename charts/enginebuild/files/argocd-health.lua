-- Argo CD health check for enginebuild.io/EngineBuild (resource.customizations.health.enginebuild.io_EngineBuild).
-- Healthy: the operator has seen the current spec (observedGeneration == generation) and Ready=True.
-- Degraded: the build for the current spec failed for good (Succeeded=False; Ready says why).
-- Progressing: anything else (not yet observed, queued, exporting, building engines).
local hs = { status = "Progressing", message = "Waiting for the enginebuild operator" }
if obj.status == nil then
  return hs
end
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
local ready = nil
local succeeded = nil
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" then
      ready = condition
    elseif condition.type == "Succeeded" then
      succeeded = condition
    end
  end
end
local function describe(condition)
  local text = condition.reason or ""
  if condition.message ~= nil and condition.message ~= "" then
    text = text .. ": " .. condition.message
  end
  return text
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end
if succeeded ~= nil and succeeded.status == "False" then
  hs.status = "Degraded"
  if ready ~= nil then
    hs.message = describe(ready)
  else
    hs.message = describe(succeeded)
  end
  return hs
end
if ready ~= nil then
  hs.message = describe(ready)
end
return hs
